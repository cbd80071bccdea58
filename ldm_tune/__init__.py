"""ldm_tune: fine-tune and sample Stable-Diffusion-style latent diffusion models with diffusers and Accelerate."""

__version__ = "0.1.0"

__all__ = ["LDMInference", "load_components", "make_scheduler", "scheduler_names", "init_model"]


def __getattr__(name):
    # Lazy: `import ldm_tune` stays cheap (diffusers and transformers take seconds to import).
    if name == "LDMInference":
        from ldm_tune.inference import LDMInference

        return LDMInference
    if name == "load_components":
        from ldm_tune.components import load_components

        return load_components
    if name in ("make_scheduler", "scheduler_names"):
        from ldm_tune import schedulers

        return getattr(schedulers, name)
    if name == "init_model":
        from ldm_tune.presets import init_model

        return init_model
    raise AttributeError(f"module 'ldm_tune' has no attribute {name!r}")
