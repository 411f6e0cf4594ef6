"""icm_dist/data/library.py: what each ``data.mechanisms`` entry computes, pinned on tiny hand-computed images
(the border and interpolation rules included), how entries resolve and are labelled, and the probe check."""

import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from icm_dist.data.library import check_mechanisms, resolve_mechanism, resolve_mechanisms
from icm_dist.data.mechanisms import MECHANISMS, uniform_per_example
from icm_dist.errors import ConfigError, DataError

SEED = 7


def apply(entry, x, ids=None, seed=SEED):
    """Resolve ``entry`` and apply it to ``x`` (ids default to 0..B-1)."""
    ids = torch.arange(x.shape[0]) if ids is None else torch.as_tensor(ids)
    return resolve_mechanism(entry).fn(x, ids, seed)


def ramp(*shape):
    """arange(n) / (n - 1) in the given shape: distinct values in [0, 1]."""
    n = math.prod(shape)
    return torch.arange(n, dtype=torch.float32).reshape(shape) / (n - 1)


def dot(size, row, col, channels=1):
    """A [1, channels, size, size] black image with one white pixel at (row, col)."""
    x = torch.zeros(1, channels, size, size)
    x[..., row, col] = 1.0
    return x


def gauss_1d(sigma, k):
    """The normalized 1-D Gaussian kernel of odd size k, by hand."""
    w = [math.exp(-0.5 * ((i - k // 2) / sigma) ** 2) for i in range(k)]
    return torch.tensor([v / sum(w) for v in w])


USER_MODULE = '''
import torch

def darken(x, ids, seed):
    return x * 0.5

def scale_by(x, ids, seed, k):
    return x * k

def to_255(x, ids, seed):
    return x * 255

def nan(x, ids, seed):
    return torch.full_like(x, float("nan"))

def wrong_shape(x, ids, seed):
    return x[..., 1:, :]

def wrong_dtype(x, ids, seed):
    return x.double()

def boom(x, ids, seed):
    raise RuntimeError("kaput")
'''


@pytest.fixture
def mymod(tmp_path, monkeypatch):
    """An importable user module ``mymod`` (removed from sys.modules afterwards)."""
    (tmp_path / "mymod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymod"
    sys.modules.pop("mymod", None)


# ----------------------------------------------------------------------------- 1. shift


def test_shift_moves_right_and_up_with_zero_fill():
    """shift dx=2, dy=-1: out[i, j] = in[i + 1, j - 2], zero where that lies outside, no wrap-around."""
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    expected = torch.tensor([[0, 0, 5, 6, 7],
                             [0, 0, 10, 11, 12],
                             [0, 0, 15, 16, 17],
                             [0, 0, 20, 21, 22],
                             [0, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(apply({"name": "shift", "dx": 2, "dy": -1}, x)[0, 0], expected)


def test_shift_4_right_is_registered_right():
    """{shift, dx: 4, dy: 0} is the paper's "right", bit for bit."""
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(6)
    assert torch.equal(apply({"name": "shift", "dx": 4, "dy": 0}, x), MECHANISMS["right"](x, ids, SEED))


# ----------------------------------------------------------------------------- 2. rotate


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_rotate_90_is_counter_clockwise_and_exact(interpolation):
    """rotate 90 = torch.rot90 (counter-clockwise: the top-right pixel goes to the top-left), both modes."""
    entry = {"name": "rotate", "degrees": 90, "interpolation": interpolation}
    x = ramp(1, 1, 5, 5)
    assert torch.equal(apply(entry, x), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(apply(entry, dot(5, 0, 4)), dot(5, 0, 0))


def test_rotate_45_bilinear_centre_and_zero_corners():
    """rotate 45 bilinear: a centred dot stays, its 4-neighbours get (1 - 1/sqrt 2)^2; corners from outside are 0."""
    y = apply({"name": "rotate", "degrees": 45}, dot(5, 2, 2))[0, 0]
    w = (1 - 1 / math.sqrt(2)) ** 2  # a 4-neighbour's source lies (1/sqrt 2, 1/sqrt 2) from the centre
    expected = torch.zeros(5, 5)
    expected[2, 2] = 1.0
    expected[1, 2] = expected[3, 2] = expected[2, 1] = expected[2, 3] = w
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    # 9x9 white: a corner's source is 4*sqrt(2) - 4 > 1 pixel beyond the frame, so nothing bleeds in.
    y = apply({"name": "rotate", "degrees": 45}, torch.ones(1, 1, 9, 9))[0, 0]
    assert y[0, 0] == y[0, -1] == y[-1, 0] == y[-1, -1] == 0.0
    assert abs(float(y[4, 4]) - 1.0) < 1e-6


# ----------------------------------------------------------------------------- 3. scale


def test_scale_half_nearest_shrinks_about_centre():
    """scale 0.5 nearest: a 4x4 block in the middle of 8x8 becomes the middle 2x2, the border 0."""
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:6, 2:6] = 1.0
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 3:5, 3:5] = 1.0  # out(i) samples in(2i - 3.5): rows 3, 4 -> 2.5, 4.5 (in the block)
    assert torch.equal(apply({"name": "scale", "factor": 0.5, "interpolation": "nearest"}, x), expected)


@pytest.mark.parametrize("factor", [0, -1])
def test_scale_factor_must_be_positive(factor):
    """scale factor <= 0 is a ConfigError at resolution."""
    with pytest.raises(ConfigError, match="factor"):
        resolve_mechanism({"name": "scale", "factor": factor})


# ----------------------------------------------------------------------------- 4. blur


def test_blur_dot_is_outer_product_of_gaussian():
    """blur sigma=1 of a centred dot in 9x9 = outer(g, g) around it, g the normalized 7-tap Gaussian; sum kept."""
    g = gauss_1d(1.0, 7)  # 2 * ceil(3 * 1) + 1 = 7
    expected = torch.zeros(9, 9)
    expected[1:8, 1:8] = torch.outer(g, g)
    y = apply({"name": "blur", "sigma": 1}, dot(9, 4, 4))[0, 0]
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    assert abs(float(y.sum()) - 1.0) < 1e-5


def test_blur_border_reflects():
    """blur's border: the image reflected about the edge pixel (torch 'reflect'), not zeros or replicate."""
    g = gauss_1d(1.0, 7)
    x = dot(9, 1, 4)  # one row in from the top edge: reflection puts a copy at row -1
    y = apply({"name": "blur", "sigma": 1}, x)
    # Row 0 sees the dot at distance 1 and its reflection at distance 1: 2 * g[2] (zeros would give g[2] alone).
    assert abs(float(y[0, 0, 0, 4]) - 2 * float(g[2]) * float(g[3])) < 1e-6
    ref = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), torch.outer(g, g)[None, None])
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    edge = dot(9, 0, 4)  # on the edge row itself
    ref = F.conv2d(F.pad(edge, (3, 3, 3, 3), mode="reflect"), torch.outer(g, g)[None, None])
    torch.testing.assert_close(apply({"name": "blur", "sigma": 1}, edge), ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- 5. noise


def test_noise_std_half_is_registered_noise_and_zero_is_identity():
    """noise std=0.5 is the paper's "noise" bit for bit; std=0 returns the input unchanged."""
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([3, 10, 11, 500])
    assert torch.equal(apply({"name": "noise", "std": 0.5}, x, ids), MECHANISMS["noise"](x, ids, SEED))
    assert torch.equal(apply({"name": "noise", "std": 0}, x, ids), x)


def test_noise_fixed_per_seed_and_example_id():
    """noise depends on (seed, id) alone: same id in another batch/position -> same image; other seed differs."""
    x = torch.full((3, 1, 8, 8), 0.5)
    entry = {"name": "noise", "std": 0.3}
    a = apply(entry, x, [5, 6, 7])
    b = apply(entry, x[:2], [7, 5])
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(apply(entry, x, [5, 6, 7], seed=SEED + 1), a)


# ----------------------------------------------------------------------------- 6. contrast


def test_contrast_gamma_2_squares():
    """contrast gamma=2: x ** 2."""
    x = ramp(1, 1, 5, 5)
    torch.testing.assert_close(apply({"name": "contrast", "gamma": 2}, x), x**2, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- 7. cutout


def test_cutout_one_square_inside_fixed_per_id():
    """cutout size=2 on 6x6 ones: one 2x2 hole wholly inside, fixed by (seed, id), varying across ids."""
    ids = torch.cat([torch.arange(49), torch.tensor([9002086])])  # drew u == 1.0 before the 23-bit fix
    x = torch.ones(50, 1, 6, 6)
    entry = {"name": "cutout", "size": 2}
    corners = []
    for seed in (SEED, 0):
        y = apply(entry, x, ids, seed=seed)
        for img in y[:, 0]:
            holes = (img == 0).nonzero()
            assert len(holes) == 4 and set(img.unique().tolist()) == {0.0, 1.0}
            top, left = holes.min(0).values.tolist()
            assert torch.equal(holes, torch.tensor([[top, left], [top, left + 1], [top + 1, left],
                                                    [top + 1, left + 1]]))
            corners.append((top, left))
    assert len(set(corners[:50])) > 1
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply(entry, x, ids[perm]), apply(entry, x, ids)[perm])


# ----------------------------------------------------------------------------- 8. flip


@pytest.mark.parametrize("axis, dim", [("h", -1), ("v", -2)])
def test_flip(axis, dim):
    """flip h mirrors left-right, v top-bottom."""
    x = ramp(1, 3, 4, 4)
    assert torch.equal(apply({"name": "flip", "axis": axis}, x), torch.flip(x, [dim]))


@pytest.mark.parametrize("entry", [{"name": "flip", "axis": "x"}, {"name": "flip"}])
def test_flip_bad_axis(entry):
    """flip with an axis other than h / v (or none) is a ConfigError."""
    with pytest.raises(ConfigError):
        resolve_mechanism(entry)


# ----------------------------------------------------------------------------- 9. permute_channels


def test_permute_channels():
    """permute_channels [2, 0, 1]: output channel i is input channel order[i]; grey probe -> DataError."""
    x = torch.stack([torch.full((4, 4), c / 2) for c in range(3)])[None]  # channel c is constant c / 2
    y = apply({"name": "permute_channels", "order": [2, 0, 1]}, x)
    assert torch.equal(y[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(y, x[:, [2, 0, 1]])
    r = resolve_mechanism({"name": "permute_channels", "order": [2, 0, 1]})
    with pytest.raises(DataError, match=re.escape(r.label)):
        check_mechanisms([r], torch.rand(2, 1, 4, 4), torch.arange(2), SEED)


# ----------------------------------------------------------------------------- 10. hue


def test_hue():
    """hue 0 is the identity; hue 1/3 turns red into green; a grey probe -> DataError naming the label."""
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(apply({"name": "hue", "shift": 0}, x), x, atol=1e-6, rtol=0)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = torch.zeros(1, 3, 2, 2)
    green[:, 1] = 1.0
    torch.testing.assert_close(apply({"name": "hue", "shift": 1 / 3}, red), green, atol=1e-4, rtol=0)
    r = resolve_mechanism({"name": "hue", "shift": 0.25, "label": "warm"})
    with pytest.raises(DataError, match="'warm'"):
        check_mechanisms([r], torch.rand(2, 1, 4, 4), torch.arange(2), SEED)


# ----------------------------------------------------------------------------- 11-12. compose and labels


def test_compose():
    """compose [invert, flip h] = flip(1 - x), labelled "invert+flip(axis=h)" unless a label is given."""
    entry = {"name": "compose", "of": ["invert", {"name": "flip", "axis": "h"}]}
    x = ramp(2, 1, 3, 4)
    r = resolve_mechanism(entry)
    assert torch.equal(r.fn(x, torch.arange(2), SEED), torch.flip(1 - x, [-1]))
    assert r.label == "invert+flip(axis=h)"
    assert resolve_mechanism({**entry, "label": "mirror_ink"}).label == "mirror_ink"


def test_labels_default_and_duplicates():
    """default label "rotate(degrees=30)"; two entries with one label are a ConfigError naming it."""
    assert resolve_mechanism({"name": "rotate", "degrees": 30}).label == "rotate(degrees=30)"
    assert resolve_mechanism("up").label == "up"
    with pytest.raises(ConfigError, match="'up'"):
        resolve_mechanisms(["up", {"name": "shift", "dy": -4, "label": "up"}])
    with pytest.raises(ConfigError, match=re.escape("'rotate(degrees=30)'")):
        resolve_mechanisms([{"name": "rotate", "degrees": 30}, {"name": "rotate", "degrees": 30}])


# ----------------------------------------------------------------------------- 13. user functions


def test_user_function_by_import_path(mymod):
    """"mymod:darken" is called as fn(x, ids, seed); {name: "mymod:scale_by", k: 0.5} with k as a keyword."""
    x = ramp(2, 1, 3, 3)
    r = resolve_mechanism("mymod:darken")
    assert r.label == "mymod:darken"
    assert torch.equal(r.fn(x, torch.arange(2), SEED), x * 0.5)
    r = resolve_mechanism({"name": "mymod:scale_by", "k": 0.25})
    assert r.label == "mymod:scale_by(k=0.25)"
    assert torch.equal(r.fn(x, torch.arange(2), SEED), x * 0.25)


@pytest.mark.parametrize("path", ["no_such_module_icm:fn", "mymod:no_such_fn"])
def test_user_function_missing(mymod, path):
    """a missing module or attribute is a ConfigError naming the path (as a string or a mapping's name)."""
    for entry in (path, {"name": path, "k": 1}):
        with pytest.raises(ConfigError, match=re.escape(path)):
            resolve_mechanism(entry)


# ----------------------------------------------------------------------------- 14. check_mechanisms


@pytest.mark.parametrize("fn, message", [
    ("to_255", "outside [0, 1]"),
    ("nan", "NaN"),
    ("wrong_shape", "(2, 1, 3, 4)"),
    ("wrong_dtype", "float64"),
    ("boom", "RuntimeError: kaput"),
])
def test_check_mechanisms_rejects(mymod, fn, message):
    """a mechanism that raises or returns out-of-range / NaN / wrong shape or dtype: one-line DataError naming it."""
    good, bad = resolve_mechanisms(["invert", f"mymod:{fn}"])
    with pytest.raises(DataError, match=re.escape(message)) as err:
        check_mechanisms([good, bad], ramp(2, 1, 4, 4), torch.arange(2), SEED)
    assert f"'mymod:{fn}'" in str(err.value) and "\n" not in str(err.value)


BOTH = [*MECHANISMS, {"name": "shift", "dx": -3, "dy": 2},
        {"name": "rotate", "degrees": 30}, {"name": "rotate", "degrees": -70, "interpolation": "nearest"},
        {"name": "scale", "factor": 0.6}, {"name": "scale", "factor": 1.5, "interpolation": "nearest"},
        {"name": "blur", "sigma": 1}, {"name": "blur", "sigma": 0.5, "kernel_size": 3},
        {"name": "noise", "std": 0.2}, {"name": "contrast", "gamma": 0.5}, {"name": "contrast", "gamma": 2},
        {"name": "cutout", "size": 5}, {"name": "flip", "axis": "h"}, {"name": "flip", "axis": "v"},
        {"name": "compose", "of": ["noise", {"name": "rotate", "degrees": 15}]}]
GREY = [{"name": "permute_channels", "order": [0]}]
RGB = [{"name": "permute_channels", "order": [2, 0, 1]}, {"name": "hue", "shift": 0.25},
       {"name": "hue", "shift": -0.5}]


@pytest.mark.parametrize("channels, extra", [(1, GREY), (3, RGB)])
def test_check_mechanisms_passes_builtins(channels, extra):
    """every registered and parameterized built-in that applies passes the probe check on random images."""
    probe = torch.rand(4, channels, 12, 12, generator=torch.Generator().manual_seed(channels))
    check_mechanisms(resolve_mechanisms(BOTH + extra), probe, torch.arange(100, 104), SEED)


# ----------------------------------------------------------------------------- 15. uniform_per_example


def test_uniform_per_example():
    """[B, k] uniforms in (0, 1) fixed by (seed, salt, id), whatever the position; other salts, other streams."""
    ids = torch.arange(1000)
    u = uniform_per_example(ids, SEED, "cutout", 3)
    assert u.shape == (1000, 3) and u.dtype == torch.float32
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert 0.45 < float(u.mean()) < 0.55
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform_per_example(ids[perm], SEED, "cutout", 3), u[perm])
    assert torch.equal(uniform_per_example(ids[:10].flip(0), SEED, "cutout", 3), u[:10].flip(0))
    assert not torch.equal(uniform_per_example(ids, SEED, "other", 3), u)
    assert not torch.equal(uniform_per_example(ids, SEED + 1, "cutout", 3), u)


# ----------------------------------------------------------------------------- bugs found and fixed


def test_blur_of_white_stays_in_range():
    """blur sigma=2 of a white image stays in [0, 1], so a saturated probe passes check_mechanisms."""
    r = resolve_mechanism({"name": "blur", "sigma": 2})
    check_mechanisms([r], torch.ones(1, 1, 16, 16), torch.arange(1), SEED)


def test_uniform_per_example_never_one():
    """uniform_per_example stays below 1: id 9002086 (seed 0, salt cutout) drew exactly 1.0 with 24 bits."""
    assert float(uniform_per_example(torch.tensor([9002086]), 0, "cutout", 2).max()) < 1
    assert float(uniform_per_example(torch.arange(300_000), 0, "cutout", 2).max()) < 1


def test_import_path_without_module_is_config_error():
    """":fn" (no module) is a ConfigError like any other unimportable path."""
    with pytest.raises(ConfigError):
        resolve_mechanism(":fn")
