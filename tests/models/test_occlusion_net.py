"""The occlusion segmenter network: diffusers save/load, shipped weights, ROI geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.occlusion_net import ROI_MARGIN, SHIPPED_OCCLUSION_WEIGHTS, OcclusionNet, load_occlusion_net, roi_affine


def test_shipped_weights_load_are_small_and_predict_half_resolution_logits() -> None:
    files = {p.name: p.stat().st_size for p in Path(SHIPPED_OCCLUSION_WEIGHTS).iterdir()}
    assert "config.json" in files and "diffusion_pytorch_model.safetensors" in files
    assert sum(files.values()) < 10 * 1024 * 1024
    net = load_occlusion_net(str(SHIPPED_OCCLUSION_WEIGHTS))
    assert not net.training
    size = net.config.input_size
    with torch.inference_mode():
        out = net(torch.rand(2, 3, size, size)).logits
    assert out.shape == (2, 1, size // 2, size // 2)
    assert torch.isfinite(out).all()


def test_save_pretrained_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = OcclusionNet(widths=(8, 16, 24, 32)).eval()
    net.save_pretrained(tmp_path)
    again = load_occlusion_net(str(tmp_path))
    assert tuple(again.config.widths) == (8, 16, 24, 32)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net(x).logits, again(x).logits, atol=1e-6)


def test_load_from_an_fsspec_url(tmp_path: Path, monkeypatch) -> None:
    import fsspec

    monkeypatch.setenv("STABLEDUB_CACHE", str(tmp_path / "cache"))
    net = OcclusionNet(widths=(8, 16, 24, 32)).eval()
    net.save_pretrained(tmp_path / "saved")
    memory = fsspec.filesystem("memory")
    for path in (tmp_path / "saved").iterdir():
        memory.pipe(f"/occlusion-test/{path.name}", path.read_bytes())
    again = load_occlusion_net("memory://occlusion-test")
    assert tuple(again.config.widths) == (8, 16, 24, 32)


def test_roi_is_a_square_around_the_masks_union() -> None:
    masks = np.zeros((2, 256, 256), np.uint8)
    masks[0, 150:190, 90:170] = 255
    masks[1, 160:200, 100:180] = 255  # the union spans x 90..180, y 150..200
    affine = roi_affine(masks, 128)
    centre = affine @ np.array([135.0, 175.0, 1.0])
    assert np.allclose(centre, [64, 64], atol=0.6)
    assert affine[0, 0] == affine[1, 1] and np.isclose(affine[0, 0], 128 / (90 * ROI_MARGIN))
    empty = roi_affine(np.zeros((1, 256, 256), np.uint8), 128)  # no mask: the crop's lower middle
    assert np.isfinite(empty).all()
