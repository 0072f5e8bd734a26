"""The latent space: presets keep SD's 4 channels at 1/8, and VAEs load from folders and fsspec URLs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models.vae import VAE_PRESETS, build_vae, check_latent_space, decode, encode, load_vae, to_pixels, to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", sorted(VAE_PRESETS))
def test_every_preset_is_sd_compatible(preset):
    config = VAE_PRESETS[preset]
    assert config["latent_channels"] == 4
    assert 2 ** (len(config["block_out_channels"]) - 1) == 8


def test_tiny_vae_encodes_real_crops_to_an_eighth(clip64):
    vae = build_vae("tiny")
    latents = encode(vae, to_pixels(clip64[:2]))
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    assert decode(vae, latents).shape == (2, 3, 64, 64)


def test_pixels_round_trip_exactly_through_float(clip64):
    np.testing.assert_array_equal(to_uint8(to_pixels(clip64[:3])), clip64[:3])


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_load_vae_from_folder_or_url(tmp_path, scheme, model_cache):
    vae = build_vae("tiny")
    if scheme == "local":
        url = str(tmp_path / "vae")
        vae.save_pretrained(url)
    else:
        url = f"memory://vae-test-{tmp_path.name}"
        local = tmp_path / "staging"
        vae.save_pretrained(str(local))
        from models.remote import upload_dir

        upload_dir(str(local), url)
    loaded = load_vae(url)
    for (name, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_vae_with_another_latent_space_is_refused():
    with pytest.raises(ValueError, match="4 channels at 1/8"):
        check_latent_space(build_vae("tiny", latent_channels=8))


def test_remote_folders_are_fetched_once_and_refreshed_on_request(tmp_path, model_cache):
    import fsspec

    from models.remote import local_dir

    url = f"memory://remote-test-{tmp_path.name}/model"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"/remote-test-{tmp_path.name}/model/sub/a.json", b"1")
    first = local_dir(url)
    assert open(os.path.join(first, "sub", "a.json")).read() == "1"
    fs.pipe(f"/remote-test-{tmp_path.name}/model/sub/a.json", b"2")
    assert local_dir(url) == first and open(os.path.join(first, "sub", "a.json")).read() == "1"  # cached
    refreshed = local_dir(url, refresh=True)
    assert open(os.path.join(refreshed, "sub", "a.json")).read() == "2"
    assert sorted(os.listdir(model_cache)) == [os.path.basename(first)]  # no staging or retired copies left


def test_shipped_face_vae_maps_128_px_crops_to_unit_scaled_16_px_latents(clip64):
    from models.images import resize_square

    folder = os.path.join(os.path.dirname(__file__), "..", "..", "models", "weights", "face_vae")
    vae = load_vae(folder)
    assert vae.config.sample_size == 128 and vae.config.scaling_factor != 1.0
    assert {k: vae.config[k] for k in ("block_out_channels", "latent_channels")} == {
        k: VAE_PRESETS["face128"][k] for k in ("block_out_channels", "latent_channels")
    }
    pixels = to_pixels(resize_square(clip64[:4], 128))
    latents = encode(vae, pixels)
    assert latents.shape == (4, 4, 16, 16)
    assert 0.3 < float(latents.std()) < 3.0  # scaled near unit variance, as the UNet's noise schedule assumes
    assert float((decode(vae, latents) - pixels).abs().mean()) < 0.2
