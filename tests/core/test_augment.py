"""Training transforms: region confusion, augmentation presets, MixUp/CutMix with the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision import tv_tensors

from torchtool.core.train.augment import RegionConfusion, batch_mixer, train_transform
from torchtool.core.data.transforms import eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blocks(image: torch.Tensor, n: int) -> list[list[torch.Tensor]]:
    bh, bw = image.shape[-2] // n, image.shape[-1] // n
    return [[image[..., r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] for c in range(n)] for r in range(n)]


def _where_blocks_went(before: torch.Tensor, after: torch.Tensor, n: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Map each output block position to the input block whose pixels it holds (exactly)."""
    src, dst = _blocks(before, n), _blocks(after, n)
    found = {}
    for r in range(n):
        for c in range(n):
            matches = [(i, j) for i in range(n) for j in range(n) if torch.equal(dst[r][c], src[i][j])]
            assert matches, f"output block {(r, c)} holds pixels found in no input block"
            found[(r, c)] = matches[0]
    return found


@pytest.fixture(scope="module")
def china() -> torch.Tensor:
    photo = Image.fromarray(load_sample_image("china.jpg")).resize((210, 140), Image.BILINEAR)
    return torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)  # uint8, 3x140x210


@pytest.mark.parametrize(("n", "k"), [(2, 1), (3, 1), (5, 2), (7, 1), (7, 3)])
def test_rcm_keeps_every_block_and_moves_none_further_than_k(china, n, k):
    rcm = RegionConfusion(n, k)
    h, w = china.shape[-2] // n * n, china.shape[-1] // n * n
    image = china[:, :h, :w]
    moved_somewhere = False
    for seed in range(20):
        torch.manual_seed(seed)
        out = rcm(image)
        assert out.shape == image.shape and out.dtype == image.dtype
        where = _where_blocks_went(image, out, n)
        assert sorted(where.values()) == [(i, j) for i in range(n) for j in range(n)], "a block was lost or doubled"
        for (r, c), (i, j) in where.items():
            assert abs(r - i) <= k and abs(c - j) <= k, f"block {(i, j)} moved to {(r, c)} with K={k}"
        moved_somewhere |= any(pos != src for pos, src in where.items())
    assert moved_somewhere, "20 draws never moved a block"


def test_rcm_displacement_reaches_k_but_not_beyond():
    n, k = 8, 2
    ids = torch.arange(n * n, dtype=torch.int32).reshape(1, n, n)
    rcm = RegionConfusion(n, k)
    largest = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = rcm(ids)[0]
        rows, cols = out // n, out % n
        grid_r, grid_c = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        largest = max(largest, int((rows - grid_r).abs().max()), int((cols - grid_c).abs().max()))
    assert largest == k


def test_rcm_leaves_the_remainder_and_handles_pil_batches_and_tv_tensors(china):
    rcm = RegionConfusion(4, 1)
    torch.manual_seed(0)
    out = rcm(china)  # 140x210: 35x52 blocks, the last 2 columns stay
    assert torch.equal(out[..., 208:], china[..., 208:])
    assert not torch.equal(out, china)
    pil = Image.fromarray(china.permute(1, 2, 0).numpy())
    torch.manual_seed(0)
    assert np.array_equal(np.asarray(rcm(pil)), out.permute(1, 2, 0).numpy())
    torch.manual_seed(0)
    wrapped = rcm(tv_tensors.Image(china))
    assert isinstance(wrapped, tv_tensors.Image) and torch.equal(wrapped.as_subclass(torch.Tensor), out)
    batch = torch.stack([china, china])
    torch.manual_seed(0)
    assert torch.equal(rcm(batch)[1], out)  # one draw for the batch, applied to each image


def test_rcm_with_no_neighbourhood_or_one_block_is_the_identity(china):
    assert torch.equal(RegionConfusion(7, 0)(china), china)
    assert torch.equal(RegionConfusion(1, 3)(china), china)
    with pytest.raises(ValueError):
        RegionConfusion(0)


def _gradient_photo(size: int = 96) -> Image.Image:
    """Brightness grows left to right, so a mirrored crop shows up as a decreasing row."""
    row = np.linspace(0, 255, size, dtype=np.float32)
    return Image.fromarray(np.repeat(np.tile(row, (size, 1))[..., None], 3, axis=2).astype(np.uint8))


def _mirrored(t: torch.Tensor) -> bool:
    row = t[0].mean(0)
    return bool(row[-1] < row[0])


def test_light_never_flips_and_standard_sometimes_does():
    photo = _gradient_photo()
    light = train_transform("light", 32, 37, MEAN, STD)
    standard = train_transform("standard", 32, 37, MEAN, STD)
    flips = {"light": 0, "standard": 0}
    for seed in range(40):
        torch.manual_seed(seed)
        flips["light"] += _mirrored(light(photo))
        torch.manual_seed(seed)
        flips["standard"] += _mirrored(standard(photo))
    assert flips["light"] == 0
    assert 5 <= flips["standard"] <= 35


def test_augment_none_is_the_evaluation_pipeline_and_rcm_joins_it(china):
    photo = Image.fromarray(china.permute(1, 2, 0).numpy())
    none = train_transform("none", 64, 73, MEAN, STD)
    expected = eval_transform(64, 73, MEAN, STD)(photo)
    assert torch.equal(none(photo), expected)
    torch.manual_seed(3)
    confused = train_transform("none", 64, 73, MEAN, STD, rcm=4, rcm_neighbour=1)(photo)
    assert confused.shape == (3, 64, 64) and confused.dtype == torch.float32
    where = _where_blocks_went(expected, confused, 4)
    assert sorted(where.values()) == sorted(where)  # the same 16 blocks, normalised like the rest


def _batch(n: int = 8, classes: int = 5):
    torch.manual_seed(0)
    return torch.randn(n, 3, 16, 16), torch.arange(n) % classes


def _smoothed_ce(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: (1 - eps) * NLL of the target + eps * mean NLL over classes, per sample."""
    logp = logits.log_softmax(1)
    return -(1 - eps) * logp.gather(1, target[:, None])[:, 0] - eps * logp.mean(1)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_pairs_images_and_labels_and_the_loss_matches_a_reference(eps):
    images, labels = _batch()
    mixer = batch_mixer(5, mixup=0.4)
    torch.manual_seed(1)
    mixed, soft = mixer(images, labels)
    assert soft.shape == (8, 5) and torch.allclose(soft.sum(1), torch.ones(8))
    lam = float(soft[0, labels[0]]) if labels[0] != labels[-1] else None
    assert lam is not None and 0 < lam < 1
    partner = labels.roll(1)  # each image is mixed with one other image of the batch
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
    logits = torch.randn(8, 5)
    loss = torch.nn.CrossEntropyLoss(label_smoothing=eps)(logits, soft)
    reference = (lam * _smoothed_ce(logits, labels, eps) + (1 - lam) * _smoothed_ce(logits, partner, eps)).mean()
    assert torch.allclose(loss, reference, atol=1e-6)


def test_cutmix_pastes_one_box_whose_area_is_the_label_weight():
    images, labels = _batch()
    torch.manual_seed(5)
    mixed, soft = batch_mixer(5, cutmix=1.0)(images, labels)
    pasted = ~torch.isclose(mixed[0], images[0]).all(0)  # pixels that came from the partner image
    assert torch.equal(mixed[0][:, pasted], images[-1][:, pasted])
    rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
    if pasted.any():  # a single rectangle
        assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    lam = float(soft[0, labels[0]])
    assert lam == pytest.approx(1 - float(pasted.float().mean()), abs=1e-6)


def test_with_both_each_batch_gets_one_of_them():
    images, labels = _batch()
    mixer = batch_mixer(5, mixup=0.4, cutmix=1.0)
    kinds = set()
    for seed in range(30):
        torch.manual_seed(seed)
        mixed, soft = mixer(images, labels)
        lam = float(soft[0, labels[0]])
        is_mixup = torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
        kinds.add("mixup" if is_mixup else "cutmix")
    assert kinds == {"mixup", "cutmix"}
    assert batch_mixer(5) is None
