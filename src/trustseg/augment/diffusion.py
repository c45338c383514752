"""The ``diffusers`` backend: SDXL / FLUX (or SD) inpainting pipelines loaded from a local folder.

Röhrich et al. 2026 (step 3) regenerate the complement with SDXL inpainting, 40 DDIM steps, guidance
7.0, strength 0.9999, seed 42 + i, a dataset-specific prompt and negative prompt; each image is resized
to the nearest SDXL aspect-ratio bucket and the result back to the native size. `diffusers` is an
optional extra (``pip install trustseg[diffusion]``), imported only here and only when used; the
pipeline is read with ``local_files_only`` (nothing is downloaded) and runs on the given device, in
float16 (bfloat16 for FLUX) on CUDA and float32 on the CPU.
"""

from __future__ import annotations

import importlib.util
import inspect
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from trustseg.augment.backends import Backend, BackendConfig, model_folder
from trustseg.errors import UserError

# SDXL's training buckets (width, height) around 1024 x 1024 pixels (Podell et al. 2023, appendix).
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))
BUCKET_MULTIPLE = 16  # latent side divisible by 2 at the VAE's factor 8

# Röhrich et al.'s dataset prompts (their dataset_configs.py): Cityscapes and BDD100K; CamVid is a
# driving dataset and gets the BDD100K one; every other dataset the dataset-free part of the Cityscapes one.
NEGATIVE_PROMPT = ("blurry, low quality, deformed, melted structures, floating objects, cartoon, illustration, "
                   "unrealistic shadows, out of perspective, wrong scale.")
PROMPTS = {
    "cityscapes": "photorealistic, ultra-detailed, 4K high-resolution, sharp focus, high quality, in the style of "
                  "Cityscapes dataset.",
    "camvid": "photorealistic dashcam image, diverse urban driving scene, high-resolution, realistic lighting and "
              "weather, sharp focus.",
}
GENERIC_PROMPT = "photorealistic, ultra-detailed, 4K high-resolution, sharp focus, high quality."


def dataset_prompts(layout: str) -> tuple[str, str]:
    """(prompt, negative prompt) for a dataset layout name."""
    return PROMPTS.get(layout, GENERIC_PROMPT), NEGATIVE_PROMPT


def nearest_bucket(height: int, width: int, resolution: int = 1024) -> tuple[int, int]:
    """(height, width) of the SDXL bucket whose aspect ratio is closest to the image's (in log ratio; ties:
    the first listed), scaled so the square bucket has side `resolution`, sides multiples of 16."""
    target = math.log(width / height)
    bucket_w, bucket_h = min(SDXL_BUCKETS, key=lambda b: abs(math.log(b[0] / b[1]) - target))
    scale = resolution / 1024

    def side(value: int) -> int:
        return max(BUCKET_MULTIPLE, round(value * scale / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)

    return side(bucket_h), side(bucket_w)


def check_diffusers(model: str | None) -> None:
    """diffusers must be installed and `model` a local pipeline folder (`model_folder`)."""
    if importlib.util.find_spec("diffusers") is None:
        raise UserError("--backend diffusers needs the diffusers package: pip install 'trustseg[diffusion]' "
                        "(or use --backend opencv | texture)")
    model_folder(model)


def load_pipeline(folder, device: torch.device):
    """The inpainting pipeline saved in `folder`, on `device`, with a DDIM scheduler where it fits."""
    try:
        import diffusers
    except ImportError as error:  # find_spec found it, but it does not import with this torch/transformers
        raise UserError(f"--backend diffusers: the diffusers package does not import ({error})") from None
    cuda = device.type == "cuda"
    try:
        pipeline = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                                               variant=weights_variant(folder))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--model {folder}: cannot load a diffusers pipeline from it ({reason})") from None
    if "mask_image" not in inspect.signature(pipeline.__call__).parameters:
        raise UserError(f"--model {folder} holds a {type(pipeline).__name__}, not an inpainting pipeline "
                        "(e.g. StableDiffusionXLInpaintPipeline or FluxFillPipeline)")
    if diffusers.DDIMScheduler in getattr(pipeline.scheduler, "compatibles", ()):
        pipeline.scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)  # Röhrich et al.: DDIM
    dtype = (torch.bfloat16 if "Flux" in type(pipeline).__name__ else torch.float16) if cuda else torch.float32
    pipeline = pipeline.to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def weights_variant(folder) -> str | None:
    """"fp16" when the folder holds only half-precision weight files (``*.fp16.safetensors``, as the
    published SDXL inpainting checkpoints offer), else None (the plain files)."""
    weights = [path.name for path in folder.rglob("*") if path.suffix in (".safetensors", ".bin")]
    return "fp16" if weights and all(".fp16." in name for name in weights) else None


def diffusers_backend(config: BackendConfig, layout: str, device: torch.device) -> Backend:
    """Inpaint with the pipeline in `config.model` (module doc); prompts default to the dataset's."""
    pipeline = load_pipeline(model_folder(config.model), device)
    default_prompt, default_negative = dataset_prompts(layout)
    options = {"prompt": config.prompt or default_prompt,
               "negative_prompt": config.negative_prompt or default_negative,
               "num_inference_steps": config.steps, "guidance_scale": config.guidance, "strength": config.strength}
    accepted = inspect.signature(pipeline.__call__).parameters
    options = {key: value for key, value in options.items() if key in accepted}  # FLUX Fill: no negative prompt

    def regenerate(image: Tensor, mask: Tensor, *, seed: int, index: int) -> Tensor:
        height, width = image.shape[-2:]
        bucket_h, bucket_w = nearest_bucket(height, width, config.resolution)
        picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((bucket_w, bucket_h), Image.LANCZOS)
        holes = Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).resize((bucket_w, bucket_h), Image.NEAREST)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            result = pipeline(image=picture, mask_image=holes, height=bucket_h, width=bucket_w, generator=generator,
                              output_type="pil", **options).images[0]
        native = np.asarray(result.convert("RGB").resize((width, height), Image.LANCZOS))
        return torch.from_numpy(native.copy()).permute(2, 0, 1).contiguous()

    return regenerate
