"""FLUX autoencoder -> diffusers AutoencoderKL conversion, against the original encoder/decoder outputs."""

import json
from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import EXPECTED_DIR, ORIGINAL_DIR, assert_close_rel, load_expected
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from diffusers_bagel.convert_flux_vae import (
    FLUX_AE_PARAMS,
    convert_flux_vae_state_dict,
    flux_vae_config,
    load_flux_vae,
)


AE_PATH = ORIGINAL_DIR / "ae.safetensors"


@pytest.fixture(scope="module")
def tiny_params():
    with open(ORIGINAL_DIR / "vae_config.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def tiny_vae(tiny_params):
    return load_flux_vae(AE_PATH, params=tiny_params)


@pytest.fixture(scope="module")
def original_weights():
    return load_file(str(AE_PATH))


# -- config ----------------------------------------------------------------------------------------------------------


def test_flux_7b_config():
    assert FLUX_AE_PARAMS["scale_factor"] == 0.3611 and FLUX_AE_PARAMS["shift_factor"] == 0.1159
    config = flux_vae_config()
    assert config["block_out_channels"] == [128, 256, 512, 512]
    assert config["layers_per_block"] == 2 and config["latent_channels"] == 16
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4
    assert config["up_block_types"] == ["UpDecoderBlock2D"] * 4
    assert config["norm_num_groups"] == 32 and config["sample_size"] == 256
    assert (config["in_channels"], config["out_channels"]) == (3, 3)
    assert (config["scaling_factor"], config["shift_factor"]) == (0.3611, 0.1159)
    assert config["use_quant_conv"] is False and config["use_post_quant_conv"] is False
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    # The FLUX autoencoder has 83,819,683 parameters and 244 tensors.
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683
    assert len(vae.state_dict()) == 244


def test_tiny_config(tiny_params):
    config = flux_vae_config(tiny_params)
    assert config["block_out_channels"] == [32, 64, 64, 64]
    assert config == flux_vae_config({**FLUX_AE_PARAMS, **tiny_params})
    # Partial params fall back to the 7B values.
    assert flux_vae_config({"ch": 64})["block_out_channels"] == [64, 128, 256, 256]


@pytest.mark.parametrize(
    "params,match",
    [
        ({"ch": 48}, "multiple of 32"),
        ({"ch": 0}, "`ch`"),
        ({"downsample": 16}, "downsample"),
        ({"ch_mult": []}, "ch_mult"),
        ({"z_chanels": 16}, "Unknown FLUX AE parameters \\['z_chanels'\\]"),
        ({"num_res_blocks": 1.5}, "num_res_blocks"),
    ],
)
def test_config_refuses_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        flux_vae_config(params)


# -- numbers against the original AutoEncoder --------------------------------------------------------------------


def test_pixel_input_is_the_png_through_totensor_normalize():
    meta, tensors = load_expected("f_vae")
    image = PIL.Image.open(EXPECTED_DIR / meta["input_image"]).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    pixels = (pixels - 0.5) / 0.5
    assert pixels.shape == (1, 3, 48, 64)
    assert_close_rel(pixels, tensors["pixel_input"], rtol=1e-6)


def test_encode_matches_original(tiny_vae):
    _, tensors = load_expected("f_vae")
    with torch.no_grad():
        dist = tiny_vae.encode(tensors["pixel_input"]).latent_dist
    assert_close_rel(dist.parameters, tensors["encoder_moments"], rtol=1e-4)
    scaled = (dist.mean - tiny_vae.config.shift_factor) * tiny_vae.config.scaling_factor
    assert_close_rel(scaled, tensors["latent_mean_scaled"], rtol=1e-4)


def test_decode_matches_original(tiny_vae):
    _, tensors = load_expected("f_vae")
    latents = tensors["latent_mean_scaled"] / tiny_vae.config.scaling_factor + tiny_vae.config.shift_factor
    with torch.no_grad():
        decoded = tiny_vae.decode(latents).sample
    assert_close_rel(decoded, tensors["decoded"], rtol=1e-4)


def test_loaded_vae_state(tiny_vae, tmp_path):
    assert not tiny_vae.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in tiny_vae.parameters())
    tiny_vae.save_pretrained(tmp_path)
    reloaded = AutoencoderKL.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(tiny_vae.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_dtype(tiny_params):
    vae = load_flux_vae(AE_PATH, params=tiny_params, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


# -- key accounting --------------------------------------------------------------------------------------------------


def test_every_original_key_consumed_exactly_once(original_weights, tiny_params):
    # Tag every original tensor with its own value, convert, and read the tags back.
    keys = sorted(original_weights)
    tagged = {key: torch.full(original_weights[key].shape, float(i + 1)) for i, key in enumerate(keys)}
    converted = convert_flux_vae_state_dict(tagged, flux_vae_config(tiny_params))
    assert len(keys) == 240 and len(converted) == len(keys)
    sources = Counter()
    for name, tensor in converted.items():
        values = tensor.unique()
        assert values.numel() == 1, f"{name} mixes several original tensors"
        sources[keys[int(values.item()) - 1]] += 1
    assert set(sources) == set(keys) and set(sources.values()) == {1}
    # Spot checks of the mapping (decoder up blocks are reversed; attention 1x1 convs become linears).
    up = converted["decoder.up_blocks.0.resnets.0.conv1.weight"]
    assert torch.equal(up, tagged["decoder.up.3.block.0.conv1.weight"])
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert tagged["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    q = converted["encoder.mid_block.attentions.0.to_q.weight"]
    assert q[0, 0] == tagged["encoder.mid.attn_1.q.weight"][0, 0, 0, 0]
    assert converted["encoder.conv_norm_out.weight"] is tagged["encoder.norm_out.weight"]
    assert "encoder.down_blocks.1.resnets.0.conv_shortcut.weight" in converted


def test_missing_key_is_refused_by_name(original_weights, tiny_params):
    config = flux_vae_config(tiny_params)
    for removed in ("decoder.up.1.upsample.conv.weight", "encoder.mid.attn_1.proj_out.bias", "encoder.conv_in.bias"):
        state_dict = {k: v for k, v in original_weights.items() if k != removed}
        with pytest.raises(ValueError, match="missing keys") as error:
            convert_flux_vae_state_dict(state_dict, config)
        assert f"'{removed}'" in str(error.value)


def test_unexpected_key_is_refused_by_name(original_weights, tiny_params):
    config = flux_vae_config(tiny_params)
    extras = ("encoder.down.0.block.0.nin_shortcut.weight", "decoder.up.4.upsample.conv.weight", "quant_conv.bias")
    for extra in extras:
        state_dict = {**original_weights, extra: torch.zeros(1)}
        with pytest.raises(ValueError, match="unexpected keys") as error:
            convert_flux_vae_state_dict(state_dict, config)
        assert f"'{extra}'" in str(error.value)
    # The tiny checkpoint against the 7B architecture: ch_mult [1,2,4,4] has two more channel changes, hence two
    # more shortcut convs than [1,2,2,2].
    with pytest.raises(ValueError, match="missing keys") as error:
        convert_flux_vae_state_dict(original_weights, flux_vae_config())
    for name in ("encoder.down.2.block.0.nin_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.bias"):
        assert f"'{name}'" in str(error.value)


def test_wrong_shape_is_refused(original_weights, tiny_params):
    state_dict = dict(original_weights)
    state_dict["decoder.conv_in.weight"] = torch.zeros(64, 16, 1, 1)
    with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight: \(64, 16, 1, 1\)"):
        convert_flux_vae_state_dict(state_dict, flux_vae_config(tiny_params))


def test_loader_refuses_extra_key_in_file(original_weights, tiny_params, tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file({**original_weights, "decoder.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="decoder.extra.weight"):
        load_flux_vae(path, params=tiny_params)


def test_loader_refuses_non_safetensors(tiny_params, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_flux_vae(garbage, params=tiny_params)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(AE_PATH.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_flux_vae(truncated, params=tiny_params)

    pickled = tmp_path / "ae.pt"
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_flux_vae(pickled, params=tiny_params)

    with pytest.raises(FileNotFoundError):
        load_flux_vae(tmp_path / "absent.safetensors", params=tiny_params)
