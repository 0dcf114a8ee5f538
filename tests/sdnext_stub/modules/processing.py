"""A minimal SD.Next generation: the order of events an extension sees, and the infotext it writes.

``process_images(p)``: ``before_process`` callbacks -> always-visible scripts' ``process`` -> for each
batch: decode the batch's latents with ``processing_vae.vae_decode(..., output_type='pil')`` and
write each image's infotext right away (``p.extra_generation_params`` included, values quoted as
SD.Next quotes them) -> scripts' ``postprocess`` -> ``after_process`` callbacks (also on error).
"""

import json

from modules import processing_vae, script_callbacks, shared


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class StableDiffusionProcessing:
    def __init__(self, *, latents, width=None, height=None, vae_type="Full", scripts=None, script_args=None):
        self.latents = latents if isinstance(latents, list) else [latents]  # one tensor per batch (n_iter)
        self.width = width
        self.height = height
        self.vae_type = vae_type
        self.scripts = scripts
        self.script_args = list(script_args if script_args is not None else (scripts.script_args if scripts else []))
        self.extra_generation_params = {}


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""


def create_infotext(p):
    args = {"Size": f"{p.width}x{p.height}", "VAE type": p.vae_type}
    args.update(p.extra_generation_params)
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in args.items() if v is not None)


def process_images(p):
    script_callbacks.before_process_callback(p)
    try:
        if p.scripts is not None:
            p.scripts.process(p)
        images, infotexts = [], []
        for latents in p.latents:
            if shared.state.interrupted:
                break
            decoded = processing_vae.vae_decode(latents=latents, model=shared.sd_model, vae_type=p.vae_type,
                                                output_type="pil", width=p.width, height=p.height)
            for image in list(decoded):
                images.append(image)
                infotexts.append(create_infotext(p))
        processed = Processed(p, images, infotexts)
        if p.scripts is not None:
            p.scripts.postprocess(p, processed)
        return processed
    finally:
        script_callbacks.after_process_callback(p)
