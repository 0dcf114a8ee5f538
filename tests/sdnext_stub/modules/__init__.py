"""A stand-in of SD.Next's ``modules`` package (vladmandic/sdnext, mid-2026) for hybrid-vae's tests.

Only the surface an extension touches, with SD.Next's names and signatures (see
shared/notes/sdnext.md): ``shared`` (opts/OptionInfo/state/cmd_opts/data_path/sd_model),
``script_callbacks``, ``scripts``/``scripts_manager`` (Script, AlwaysVisible, load_scripts),
``processing_vae`` (vae_decode, full_vae_decode, vae_postprocess), ``processing`` (a minimal
process_images that fires the callbacks and writes the infotext), ``devices``, ``errors``, ``paths``,
``sd_vae``. Written for the tests, not copied from SD.Next.
"""
