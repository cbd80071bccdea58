"""Memory and speed switches of `LDMInference`, under diffusers' pipeline names; each delegates to diffusers,
accelerate or torch.

- `enable_vae_slicing`: `AutoencoderKL.enable_slicing` decodes a batch one image at a time: the same images, the
  peak memory of one.
- `enable_vae_tiling`: `AutoencoderKL.enable_tiling` decodes (and encodes) in overlapping tiles blended at their
  seams, so images far larger than the VAE was built for fit in memory. Pixels near the seams change.
- `enable_attention_slicing`: `UNet2DConditionModel.set_attention_slice` computes attention a group of heads at a
  time (`SlicedAttnProcessor`). It replaces PyTorch 2's fused `scaled_dot_product_attention`, which already saves
  memory, so diffusers advises it only where that is missing (docs: optimization/memory).
- `enable_model_cpu_offload` (CUDA): accelerate's `cpu_offload_with_hook`, chained text encoder -> UNet -> VAE as
  `DiffusionPipeline.enable_model_cpu_offload` does: each model moves to the GPU when it is called and back to the
  CPU when the next one is, so one model at a time takes GPU memory.
- `enable_channels_last`: the UNet's and VAE's weights in channels-last (NHWC) memory order, which oneDNN's CPU
  convolutions take without reordering. Off by default: `make bench` measured +4-7 % images/s on the tiny preset but
  -12 to -17 % on the SD 1.5 architecture at 256 px (2026-12-01, Xeon AVX-512), images within 7.2e-6.
- `compile_unet`: `torch.compile` of the UNet in place (`nn.Module.compile`): the module keeps its type, config and
  LoRA loading; the first call compiles. `freeze=True` adds inductor's `freezing` (the weights become constants
  of the compiled code, so oneDNN can pre-pack them), the setting Intel's CPU inference guides use (it is
  process-wide: `torch._inductor.config.freezing`); see the README's speed table. The weights are then fixed:
  LoRAs are loaded and scaled before.

The switches that can change pixels (tiling, attention slicing, compile) are recorded in the parameters JSON
(`switches`); `ldm-tune generate --from-png` turns tiling and attention slicing on again.
"""

from __future__ import annotations

import torch


class SpeedSwitchesMixin:
    """Memory and speed switches for a pipeline with `vae`, `text_encoder` and `unet` (see the module docstring)."""

    _offload_device: torch.device | None = None
    _offload_hooks: list | tuple = ()
    _attention_slice: str | int | None = None
    _compile_mode: str | None = None

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time: the same images, the peak memory of one image."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self, tile_size: int | None = None) -> None:
        """Decode and encode images larger than `tile_size` pixels (default: the VAE's `sample_size`, 512 for SD 1.5)
        in tiles overlapping by a quarter, blended at the seams (for large images; pixels near the seams change)."""
        if tile_size is not None:
            factor = self.vae_scale_factor
            if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size <= 0 or tile_size % factor:
                raise ValueError(
                    f"`tile_size` must be a positive multiple of {factor} (the VAE scale factor), got {tile_size!r}."
                )
            self.vae.tile_sample_min_size = tile_size
            self.vae.tile_latent_min_size = tile_size // factor
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Compute attention in slices of heads: "auto" halves each layer's heads, "max" one head at a time, an int
        that many heads per slice; None turns slicing off (back to the default attention processor)."""
        self.unet.set_attention_slice(slice_size)
        self._attention_slice = slice_size

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """Keep the models in CPU memory and move each to the GPU only while it runs (CUDA only).

        Raises:
            ValueError: `device` is not a CUDA device, or this machine has no CUDA.
        """
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            reason = "this machine has no CUDA" if not torch.cuda.is_available() else "it is not a CUDA device"
            raise ValueError(
                f"`enable_model_cpu_offload` needs a CUDA device, got {str(device)!r} ({reason}; the pipeline is on "
                f"{self.device}). On the CPU every model already sits in CPU memory: leave offload off."
            )
        from accelerate import cpu_offload_with_hook

        device = torch.device("cuda", gpu_id if gpu_id is not None else device.index or 0)
        self.disable_model_cpu_offload()
        self.to("cpu")
        hook, self._offload_hooks = None, []
        for model in (self.text_encoder, self.unet, self.vae):  # diffusers' model_cpu_offload_seq
            _, hook = cpu_offload_with_hook(model, device, prev_module_hook=hook)
            self._offload_hooks.append(hook)
        self._offload_device = device

    def disable_model_cpu_offload(self) -> None:
        """Remove the offload hooks; the models stay in CPU memory (move them with `to`)."""
        for hook in self._offload_hooks:
            hook.offload()
            hook.remove()
        self._offload_hooks, self._offload_device = [], None

    def offload_models(self) -> None:
        """Under model CPU offload, send every model back to the CPU (diffusers' `maybe_free_model_hooks`)."""
        for hook in self._offload_hooks:
            hook.offload()

    def enable_channels_last(self) -> None:
        """Keep the UNet's and VAE's weights in channels-last memory order (see the module docstring)."""
        for model in (self.unet, self.vae):
            model.to(memory_format=torch.channels_last)

    def disable_channels_last(self) -> None:
        for model in (self.unet, self.vae):
            model.to(memory_format=torch.contiguous_format)

    def compile_unet(self, mode: str | None = None, fullgraph: bool = False, freeze: bool = False) -> None:
        """`torch.compile` the UNet in place; `mode` as torch.compile ("reduce-overhead" uses CUDA graphs,
        "max-autotune" searches kernels). The first generation compiles, later ones at the same shapes are faster.
        `freeze`: inductor's `freezing` (weights compiled in as constants; see the module docstring): LoRAs cannot
        be loaded or rescaled afterwards."""
        # With "max-autotune" (inductor's CPU GEMM templates) freezing took a 256 px SD 1.5 UNet call from 1.45 to
        # 1.34 s but a whole image from 16.9 to 17.9 s, after a 169 s compile instead of 102 (2026-12-02, 2 cores of a
        # Xeon with AVX-512, fresh processes): not worth a combination to support and test.
        if freeze and mode is not None:
            raise ValueError(f"`mode` must be None with `freeze=True`, got {mode!r}.")
        if freeze:
            # Process-wide, as Intel's guides set it: dynamo reads the switch when it traces (at the first call) to
            # keep the weights out of the graph's inputs. Passed as `options={"freezing": True}` it reaches only
            # inductor, and the weights stayed inputs: 1.88 s per SD 1.5 UNet call at 256 px, not 1.40 (same host).
            # It applies to compiles without autograd only.
            import torch._inductor.config

            torch._inductor.config.freezing = True
        self.unet.compile(fullgraph=fullgraph, mode=mode)
        self._compile_mode = "freezing" if freeze else mode or "default"

    def _check_weights_not_frozen(self, action: str) -> None:
        if self._compile_mode == "freezing":
            raise ValueError(f"Cannot {action}: the UNet was compiled with `freeze=True`, which fixed its weights; "
                             "load and scale LoRAs before `compile_unet(freeze=True)`.")  # fmt: skip

    @property
    def switches(self) -> dict:
        """The switches on that can change pixels, for the parameters JSON (None: off)."""
        return {
            "vae_tiling": self.vae.tile_sample_min_size if getattr(self.vae, "use_tiling", False) else None,
            "attention_slicing": self._attention_slice,
            "compile": self._compile_mode,
        }
