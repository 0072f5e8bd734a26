"""StableDubUNet: shapes and dtypes for every preset, config contract, save/load, SD initialisation."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from models.mamba import MambaLayer
from models.unet import SpatialMamba, StableDubUNet, TemporalMixer, load_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def unet_inputs(frames=4, size=8, batch=1, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return dict(
        sample=randn(batch, frames, 4, size, size),
        timestep=torch.tensor([500] * batch, device=device),
        masked_latent=randn(batch, frames, 4, size, size),
        mask=torch.rand(batch, frames, 1, size, size, generator=g).to(device),
        reference_latent=randn(batch, frames, 4, size, size),
        audio_features=randn(batch, frames, 16, 80),
        occlusion=torch.zeros(batch, frames, 1, size, size, device=device),
    )


def test_tiny_unet_gives_one_latent_per_frame():
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny").eval()
    with torch.no_grad():
        out = unet(**unet_inputs(frames=5, batch=2)).sample
    assert out.shape == (2, 5, 4, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_small_unet_shapes_at_a_reduced_resolution():
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("small").eval()
    with torch.no_grad():
        out = unet(**unet_inputs(frames=2, size=16)).sample
    assert out.shape == (1, 2, 4, 16, 16)


def test_sd_sized_unet_shapes_without_allocating_weights():
    with torch.device("meta"):
        unet = StableDubUNet.from_preset("sd")
        with torch.no_grad():
            out = unet(**unet_inputs(frames=2, size=16, device="meta")).sample
    assert out.shape == (1, 2, 4, 16, 16) and out.dtype == torch.float32
    assert 0.9e9 < sum(p.numel() for p in unet.parameters()) < 1.1e9


def test_bfloat16_weights_give_bfloat16_output():
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny").to(torch.bfloat16).eval()
    with torch.no_grad():
        out = unet(**unet_inputs(frames=2)).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_config_chooses_the_mixers():
    hybrid = StableDubUNet.from_preset("tiny")
    plain = StableDubUNet.from_preset("tiny", spatial_mixers=["attention", "attention"], temporal_mixer="attention")
    assert any(isinstance(m, SpatialMamba) for m in hybrid.modules())
    assert any(isinstance(m, TemporalMixer) and isinstance(m.mixer, MambaLayer) for m in hybrid.modules())
    assert not any(isinstance(m, MambaLayer) for m in plain.modules())
    with pytest.raises(ValueError, match="spatial_mixers"):
        StableDubUNet.from_preset("tiny", spatial_mixers=["conv", "attention"])


def test_config_records_the_audio_features_it_expects():
    unet = StableDubUNet.from_preset("tiny")
    assert unet.audio_spec == {"encoder": "logmel", "window": 16, "dim": 80}
    inputs = unet_inputs(frames=2)
    inputs["audio_features"] = torch.zeros(1, 2, 30, 384)  # e.g. Whisper-tiny windows
    with pytest.raises(ValueError, match="expects 16x80"):
        unet(**inputs)


def test_same_inputs_same_output_and_other_audio_other_output():
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny").eval()
    inputs = unet_inputs(frames=3)
    with torch.no_grad():
        first, second = unet(**inputs).sample, unet(**inputs).sample
        inputs["audio_features"] = inputs["audio_features"] + 1.0
        other = unet(**inputs).sample
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_save_and_load_give_identical_weights_and_outputs(tmp_path):
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny").eval()
    unet.save_pretrained(tmp_path / "unet")
    loaded = StableDubUNet.from_pretrained(tmp_path / "unet").eval()
    assert public(loaded.config) == public(unet.config)
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(unet(**unet_inputs()).sample, loaded(**unet_inputs()).sample)


def test_presets_are_valid_configs():
    for name in ("tiny", "small", "sd"):
        preset = load_preset(name)
        assert preset["audio_encoder"] and preset["audio_window"] and preset["audio_dim"]
    with pytest.raises(ValueError, match="unknown UNet preset"):
        load_preset("huge")


def tiny_sd_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def test_from_sd_unet_widens_conv_in_and_reuses_what_fits(tmp_path, model_cache):
    torch.manual_seed(0)
    sd = tiny_sd_unet()
    sd.save_pretrained(tmp_path / "sd" / "unet")
    unet = StableDubUNet.from_sd_unet(str(tmp_path / "sd"))
    ours, theirs = unet.state_dict(), sd.state_dict()

    # conv_in: SD's weights for the noisy latent, zeros for the conditioning channels.
    assert torch.equal(ours["conv_in.weight"][:, :4], theirs["conv_in.weight"])
    assert not ours["conv_in.weight"][:, 4:].any()
    for key in (
        "down_blocks.1.resnets.0.conv1.weight",
        "mid_block.resnets.1.conv2.weight",
        "conv_out.weight",
        "time_embedding.linear_1.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
    ):
        assert torch.equal(ours[key], theirs[key]), key
    block = "down_blocks.0.attentions.0"
    assert torch.equal(ours[f"{block}.proj_in.weight"], theirs[f"{block}.proj_in.weight"][:, :, 0, 0])
    assert torch.equal(
        ours[f"{block}.transformer_blocks.0.attn2.to_k.weight"], theirs[f"{block}.transformer_blocks.0.attn2.to_k.weight"]
    )
    assert torch.equal(
        ours[f"{block}.transformer_blocks.0.ff.net.2.weight"], theirs[f"{block}.transformer_blocks.0.ff.net.2.weight"]
    )
    # Mid level keeps self-attention: SD's attn1 is reused there.
    mid = "mid_block.attentions.0.transformer_blocks.0"
    assert torch.equal(ours[f"{mid}.attn1.to_q.weight"], theirs[f"{mid}.attn1.to_q.weight"])
    # New paths start as no-ops so the SD prior is intact on the first step.
    assert torch.equal(
        ours[f"{block}.transformer_blocks.0.attn_audio.to_q.weight"], theirs[f"{block}.transformer_blocks.0.attn2.to_q.weight"]
    )
    assert not ours[f"{block}.transformer_blocks.0.attn_audio.to_out.0.weight"].any()
    assert not ours[f"{block}.transformer_blocks.0.temporal.mixer.out_proj.weight"].any()
    assert list(unet.config.block_out_channels) == [32, 64]
    with torch.no_grad():
        assert unet(**unet_inputs(frames=2)).sample.shape == (1, 2, 4, 8, 8)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny")
    inputs = unet_inputs(frames=2)
    unet(**inputs).sample.square().mean().backward()
    plain = {k: p.grad.clone() for k, p in unet.named_parameters()}
    unet.zero_grad()
    unet.enable_gradient_checkpointing()
    unet(**inputs).sample.square().mean().backward()
    for key, p in unet.named_parameters():
        torch.testing.assert_close(p.grad, plain[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_reference_prior_unet_starts_as_its_prior_and_learns_corrections():
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny", output_prior="reference").eval()
    inputs = unet_inputs(frames=3)
    prior = unet.output_prior_latent(inputs["masked_latent"], inputs["mask"], inputs["reference_latent"])
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, prior)  # conv_out starts at zero
        torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
        assert not torch.allclose(unet(**inputs).sample, prior)
    inside = inputs["mask"] == 1
    assert torch.equal(prior[inside.expand_as(prior)], inputs["reference_latent"][inside.expand_as(prior)])
    with pytest.raises(ValueError, match="output_prior"):
        StableDubUNet.from_preset("tiny", output_prior="mouth")
