"""Stand-in for ``comfy.model_patcher`` (tests only)."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device

    def get_free_memory(self, device):
        from comfy import model_management

        return model_management.get_free_memory(device)

    def is_dynamic(self):
        return False
