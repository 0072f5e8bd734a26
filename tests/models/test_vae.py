"""The latent space: presets keep SD's 4 channels at 1/8, and VAEs load from folders and fsspec URLs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models.vae import (
    VAE_PRESETS,
    build_vae,
    check_latent_space,
    crop_size,
    decode,
    downsampling,
    encode,
    latent_channels,
    load_vae,
    to_pixels,
    to_uint8,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", sorted(VAE_PRESETS))
def test_every_preset_downsamples_by_eight_and_the_kl_ones_are_sd_compatible(preset):
    vae = build_vae(preset)
    assert downsampling(vae) == 8
    # Stable Diffusion's latent space (4 channels) for the KL presets; face128 has 16 channels.
    assert latent_channels(vae) == (16 if preset == "face128" else 4)
    if preset == "face128":
        latents = encode(vae, torch.zeros(1, 3, 128, 128))
        assert latents.shape == (1, 16, 16, 16) and decode(vae, latents).shape == (1, 3, 128, 128)


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
    with pytest.raises(ValueError, match="downsamples by 4; StableDub needs 1/8"):
        check_latent_space(
            build_vae(
                "tiny",
                block_out_channels=[8, 16, 16],
                down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3,
            )
        )
    from models.lip_habit import LipHabitEncoder
    from models.pipeline_stabledub import StableDubPipeline, make_scheduler
    from models.unet import StableDubUNet

    unet = StableDubUNet.from_preset("tiny")  # 4 latent channels
    with pytest.raises(ValueError, match="the VAE gives 16 latent channels; the UNet takes 4"):
        StableDubPipeline(
            vae=build_vae("face128"),
            unet=unet,
            lip_habit=LipHabitEncoder(audio_channels=unet.config.audio_channels),
            scheduler=make_scheduler(),
        )


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
    assert crop_size(vae) == 128 and vae.config.scaling_factor != 1.0
    keys = ("encoder_block_out_channels", "num_encoder_blocks", "num_decoder_blocks", "latent_channels")
    assert {k: list(vae.config[k]) if isinstance(vae.config[k], (list, tuple)) else vae.config[k] for k in keys} == {
        k: VAE_PRESETS["face128"][k] for k in keys
    }
    pixels = to_pixels(resize_square(clip64[:4], 128))
    latents = encode(vae, pixels)
    assert latents.shape == (4, 16, 16, 16)
    assert 0.3 < float(latents.std()) < 3.0  # scaled near unit variance, as the UNet's noise schedule assumes
    assert float((decode(vae, latents) - pixels).abs().mean()) < 0.2
