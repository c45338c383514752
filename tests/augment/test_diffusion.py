"""The diffusers backend with a tiny, randomly initialised SDXL inpainting pipeline built here (no
download): loading from a local folder, aspect-ratio buckets, prompts and settings, mask handling, and
`trustseg augment --backend diffusers` end to end."""

import functools
import json
import math

import numpy as np
import pytest
import torch

from cli_helpers import run_cli, save_tiny_unet
from trustseg.augment.backends import BackendConfig, build_backend
from trustseg.augment.diffusion import NEGATIVE_PROMPT, PROMPTS, SDXL_BUCKETS, nearest_bucket
from trustseg.data.base import ClassInfo
from trustseg.data.readers import read_image, read_mask_array
from trustseg.data.spec import load_dataset
from trustseg.data.synthetic import CLASS_NAMES, PALETTE
from trustseg.errors import UserError

def byte_characters():
    """The 256 characters of byte-level BPE (GPT-2's byte-to-unicode table): printable bytes stand for
    themselves, the others are shifted above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A randomly initialised SDXL inpainting pipeline (9-channel UNet, as SDXL inpainting 0.1) saved to a folder."""
    pytest.importorskip("diffusers")  # here, not at collection: importing diffusers takes seconds
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    chars = byte_characters()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab), projection_dim=32)
    # time ids: original size, crop corner, target size (6 values) x 8 + the pooled text embedding (32)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    pipeline = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, requires_aesthetics_score=False)
    pipeline.save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every pipeline call, the call itself still running."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionXLInpaintPipeline

    seen = []
    original = StableDiffusionXLInpaintPipeline.__call__

    @functools.wraps(original)  # the backend reads the call's signature
    def spy(self, *args, **kwargs):
        seen.append({**kwargs, "scheduler": type(self.scheduler).__name__})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLInpaintPipeline, "__call__", spy)
    return seen


def test_buckets_follow_the_aspect_ratio_and_the_resolution():
    assert nearest_bucket(1024, 2048) == (768, 1344)  # 2:1 -> 1344 x 768 (W x H), the closest ratio
    assert nearest_bucket(720, 960) == (896, 1152)
    assert nearest_bucket(960, 720) == (1152, 896)
    assert nearest_bucket(500, 500) == (1024, 1024)
    for width, height in SDXL_BUCKETS:  # every bucket is its own nearest, and keeps about 1024^2 pixels
        assert nearest_bucket(height, width) == (height, width)
        assert abs(width * height / 1024 ** 2 - 1) < 0.07
    assert nearest_bucket(720, 960, resolution=512) == (448, 576)


@pytest.mark.slow
def test_the_backend_loads_the_folder_and_inpaints_at_the_bucket_with_the_paper_settings(tiny_pipeline, calls,
                                                                                         one_thread):
    backend = build_backend(BackendConfig(name="diffusers", model=str(tiny_pipeline), resolution=128, steps=2),
                            None, "cityscapes", torch.device("cpu"))
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[:, 20:] = True
    out = backend(image, mask, seed=7, index=0)
    assert out.shape == image.shape and out.dtype == torch.uint8
    (call,) = calls
    assert (call["height"], call["width"]) == nearest_bucket(30, 40, 128) == (112, 144)
    assert call["prompt"] == PROMPTS["cityscapes"] and call["negative_prompt"] == NEGATIVE_PROMPT
    assert call["guidance_scale"] == 7.0 and call["num_inference_steps"] == 2 and call["strength"] == 0.9999
    assert call["scheduler"] == "DDIMScheduler"
    holes = np.asarray(call["mask_image"])  # white = regenerate, resized with the image
    assert holes.shape == (112, 144) and (holes[:, :72] == 0).all() and (holes[:, 72:] == 255).all()
    assert call["image"].size == (144, 112)
    assert torch.equal(out, backend(image, mask, seed=7, index=0))  # seeded
    assert not torch.equal(out, backend(image, mask, seed=8, index=0))
    assert BackendConfig().steps == 40 and BackendConfig().guidance == 7.0


@pytest.mark.slow
def test_augment_with_the_tiny_pipeline_labels_only_preserved_pixels(tiny_pipeline, tmp_path, monkeypatch, calls,
                                                                     one_thread):
    classes = ClassInfo(CLASS_NAMES, PALETTE)
    save_tiny_unet(tmp_path / "model.pt", classes)
    data = "synthetic#size=32,num_images=2"
    out = tmp_path / "out"
    code = run_cli(["augment", "--data", data, "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out),
                    "--backend", "diffusers", "--model", str(tiny_pipeline), "--steps", "2", "--resolution", "64",
                    "--tau", "0.5", "--preview-rows", "1", "--no-progress"], monkeypatch)
    assert code in (0, None)
    assert len(calls) == 2 and all((c["height"], c["width"]) == (64, 64) for c in calls)
    source = load_dataset(data)
    for entry in json.loads((out / "manifest.json").read_text())["images"]:
        original = source[entry["source_index"]]
        labels = torch.from_numpy(read_mask_array(out / entry["mask"]).astype(np.int64))
        image = read_image(out / entry["image"])
        kept = labels != 255
        assert torch.equal(labels[kept], original["mask"][kept])
        assert torch.equal(image[:, kept], original["image"][:, kept])
        assert math.isfinite(entry["score"])


@pytest.mark.slow
def test_a_folder_of_half_precision_weights_loads(tiny_pipeline, tmp_path):
    from diffusers import DiffusionPipeline

    from trustseg.augment.diffusion import load_pipeline

    DiffusionPipeline.from_pretrained(str(tiny_pipeline), local_files_only=True).save_pretrained(
        str(tmp_path / "fp16"), variant="fp16")
    assert all(".fp16." in p.name for p in (tmp_path / "fp16").rglob("*.safetensors"))
    pipeline = load_pipeline(tmp_path / "fp16", torch.device("cpu"))
    assert type(pipeline).__name__ == "StableDiffusionXLInpaintPipeline" and pipeline.unet.dtype == torch.float32


def test_a_folder_without_a_pipeline_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no model_index.json"):
        build_backend(BackendConfig(name="diffusers", model=str(tmp_path)), None, "folder", torch.device("cpu"))
