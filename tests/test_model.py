"""The paper's AlexNet, checked against the paper: sizes, parameter count, LRN formula,
initialisation, tower connectivity, placement equivalence and checkpoint portability."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from common.config import ConfigError, from_dict
from model import AlexNet, AlexNetConfig, local_response_norm

PAPER_PARAMS = 60_965_224          # two towers, 1000 classes
ONE_TOWER_PARAMS = 59_798_312      # the paper's single-GPU net (conv5 and fc kept full size)


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Centred pixels on the 0-255 scale (std ~60, like real images minus the mean)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g) * 60


def small_net(**kw) -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(AlexNetConfig(num_classes=kw.pop("num_classes", 10), **kw))


@pytest.fixture(scope="module")
def net10() -> AlexNet:
    """A 10-class net shared by tests that only place it, set its mode and run it."""
    return small_net()


@pytest.fixture(scope="module")
def paper_net() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(AlexNetConfig())


# ---- architecture -----------------------------------------------------------------------

def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_parameter_count_is_the_papers(paper_net):
    assert count(paper_net) == PAPER_PARAMS
    assert count(AlexNet(AlexNetConfig(towers=1))) == ONE_TOWER_PARAMS


def test_benchmark_reference_has_the_same_parameters():
    from bench.model import reference_net
    assert count(reference_net()) == PAPER_PARAMS


PAPER_SHAPES = {  # per tower: channels, height, width (paper: 55 -> 27 -> 13 -> 13 -> 13 -> 6)
    "conv1": (48, 55, 55), "pool1": (48, 27, 27), "conv2": (128, 27, 27), "pool2": (128, 13, 13),
    "conv3": (192, 13, 13), "conv4": (192, 13, 13), "conv5": (128, 13, 13), "pool5": (128, 6, 6),
    "fc6": (2048,), "fc7": (2048,)}


@pytest.mark.parametrize("overlap_pool", [True, False])
@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_layer_shapes(overlap_pool, devices, net10):
    # 2x2/2 pooling gives the same 27 / 13 / 6 as 3x3/2 (the paper says so too).
    net = net10 if overlap_pool else small_net(overlap_pool=False)
    net.place(devices).eval()
    with torch.no_grad():
        seen = net.trace(images(2))
    for name, shape in PAPER_SHAPES.items():
        assert [tuple(t.shape) for t in seen[name]] == [(2, *shape)] * 2, name
    assert tuple(seen["fc8"][0].shape) == (2, 10)


def test_single_tower_net_shapes():
    net = small_net(towers=1).eval()
    with torch.no_grad():
        seen = net.trace(images(1))
    got = {name: tuple(seen[name][0].shape[1:]) for name in PAPER_SHAPES}
    assert got == {**PAPER_SHAPES, "conv5": (256, 13, 13), "pool5": (256, 6, 6),
                   "fc6": (4096,), "fc7": (4096,)}
    assert all(len(seen[name]) == 1 for name in PAPER_SHAPES)


def test_conv3_and_fc_read_both_towers_other_layers_only_their_own(paper_net):
    t = paper_net.towers[0]
    assert t.conv1.weight.shape == (48, 3, 11, 11)
    assert t.conv2.weight.shape == (128, 48, 5, 5)     # own tower's 48
    assert t.conv3.weight.shape == (192, 256, 3, 3)    # both towers' 2 x 128
    assert t.conv4.weight.shape == (192, 192, 3, 3)    # own
    assert t.conv5.weight.shape == (128, 192, 3, 3)    # own
    assert t.fc6.weight.shape == (2048, 9216)          # both: 2 x 128 x 6 x 6
    assert t.fc7.weight.shape == (2048, 4096)          # both
    assert paper_net.fc8.weight.shape == (1000, 4096)


# ---- dropout ----------------------------------------------------------------------------

def test_dropout_only_in_training(net10):
    net = net10.place(["cpu"])
    assert net.cfg.dropout == 0.5
    x = images(2)
    with torch.no_grad():
        net.eval()
        plain = net.trace(x)
        assert torch.equal(net(x), net(x))
        net.train()
        dropped = net.trace(x)
    alive = plain["fc6"][0] > 0                  # units ReLU let through in eval mode
    kept = dropped["fc6"][0] != 0
    # about half of them are dropped in training (4096 units x 2 images) ...
    assert 0.45 < 1 - kept[alive].float().mean().item() < 0.55
    assert not kept[~alive].any()
    # ... and the kept ones are the eval-mode values scaled by 1 / (1 - p)
    torch.testing.assert_close(dropped["fc6"][0][kept], 2 * plain["fc6"][0][kept])


def test_dropout_zero_is_off():
    net = small_net(dropout=0.0).train()
    x = images(1)
    with torch.no_grad():
        assert torch.equal(net(x), net.eval()(x))


# ---- LRN --------------------------------------------------------------------------------

def lrn_loop(a: np.ndarray, size=5, alpha=1e-4, beta=0.75, k=2.0) -> np.ndarray:
    """The paper's formula, channel by channel, the window clipped at the edges."""
    out = np.empty_like(a)
    n_ch = a.shape[1]
    for i in range(n_ch):
        lo, hi = max(0, i - size // 2), min(n_ch - 1, i + size // 2)
        total = sum(a[:, j] ** 2 for j in range(lo, hi + 1))
        out[:, i] = a[:, i] / (k + alpha * total) ** beta
    return out


def lrn_input(channels=9) -> torch.Tensor:
    # Large activations so that alpha * sum is comparable to k: the normalisation matters.
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, channels, 4, 3, generator=g, dtype=torch.float64) * 100


def test_lrn_matches_the_formula_including_edge_channels():
    x = lrn_input()
    want = lrn_loop(x.numpy())
    got = local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=2.0).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # edge channels really are clipped (a wrap-around or a mean would differ)
    np.testing.assert_allclose(got[:, [0, 1, -2, -1]], want[:, [0, 1, -2, -1]], rtol=1e-12)
    assert np.abs(want - x.numpy() / 2.0 ** 0.75).max() > 1.0   # and LRN is not a constant scale


def test_lrn_groups_normalise_each_tower_alone():
    x = lrn_input(channels=10)
    got = local_response_norm(x, groups=2).numpy()
    a = x.numpy()
    np.testing.assert_allclose(got, np.concatenate([lrn_loop(a[:, :5]), lrn_loop(a[:, 5:])], 1), rtol=1e-12)


def test_lrn_alpha_is_not_divided_by_size_unlike_torch():
    x = lrn_input()
    ours = local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=2.0)
    torch_same_alpha = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(x)
    assert (ours - torch_same_alpha).abs().max() > 1e-2 * ours.abs().max()
    # torch divides alpha by size: the paper's LRN is torch's with alpha * size
    torch.testing.assert_close(ours, torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(x))


@pytest.mark.parametrize("size", [5, 4])
def test_lrn_gradient_and_channels_last(size):
    """The hand-written backward against finite differences (contiguous and channels_last)."""
    fn = lambda a: local_response_norm(a, size, 1e-2, 0.75, 2.0, groups=2)  # noqa: E731
    tiny = (lrn_input(channels=6)[:1, :, :2, :1] / 10).requires_grad_()   # 3 channels per group < size
    assert torch.autograd.gradcheck(fn, (tiny,))
    x = (lrn_input(channels=16) / 10).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xc,), fast_mode=True)
    torch.testing.assert_close(fn(xc), fn(x))


def conv1_scale_activations() -> torch.Tensor:
    """ReLU outputs of conv1's size class: alpha * sum a^2 ~ 0.005, small beside k = 2, which
    is where a half-precision sum (spacing 0.0156 near 2 in bf16) rounds LRN away."""
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(2, 96, 12, 12, generator=g) * 4)


def half_ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at each value of the float32 tensor t (the spacing above
    |t| rounded, so a value rounded onto a power of two gets the wider of its two spacings)."""
    low = t.abs().to(dtype)
    up = torch.nextafter(low, torch.full_like(low, float("inf"))).float()
    return (up - low.float()).abs() / 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_half_precision_computes_the_normalisation_in_float32(dtype, channels_last, device):
    """Under autocast the output is the float32 LRN of the same input, rounded once to the
    input's dtype: never more than half a unit in the last place off, for both the forward
    and the hand-written backward (so fp16 is within 1e-3 relative everywhere; bf16's own
    rounding is 2^-8, and its error has no bias)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = conv1_scale_activations().to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    assert 1e-3 < 1e-4 * 5 * x32.square().mean().item() < 1e-2     # the regime the docstring names
    want = local_response_norm(x32, groups=2)
    with torch.autocast(device, dtype=dtype):
        got = local_response_norm(x, groups=2)
    assert got.dtype == dtype
    assert ((got.float() - want).abs() <= half_ulp(want.detach(), dtype)).all().item()
    rel = ((got.float() - want) / want)[want != 0]
    assert abs(rel.mean().item()) < 1e-4
    if dtype == torch.float16:
        assert rel.abs().max().item() < 1e-3
    # backward: the same g (representable in dtype) through both; dx rounded once
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    want.backward(g.float())
    got.backward(g)
    assert x.grad.dtype == dtype
    assert ((x.grad.float() - x32.grad).abs() <= half_ulp(x32.grad, dtype)).all().item()


def test_lrn_bad_input():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        local_response_norm(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="groups"):
        local_response_norm(torch.zeros(1, 5, 2, 2), groups=2)


# ---- initialisation ---------------------------------------------------------------------

def test_paper_init(paper_net):
    for name, layer in paper_net.layers():
        w = layer.weight.detach()
        assert abs(w.std().item() - 0.01) < 0.03 * 0.01, name
        assert abs(w.mean().item()) < 0.001, name
        want = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, want)), name


def test_kaiming_init():
    net = small_net(init="kaiming", num_classes=1000)
    for name, layer in net.layers():
        fan_in = layer.weight[0].numel()
        assert abs(layer.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.03, name
        assert torch.count_nonzero(layer.bias) == 0, name


# ---- towers ------------------------------------------------------------------------------

def _poke_tower0(at: str):
    """An edit for ``trace``: add positive noise to tower 0's output of stage ``at``."""
    def perturb(name, parts):
        if name == at:
            parts = [parts[0] + 5.0 * torch.rand_like(parts[0]), *parts[1:]]
        return parts
    return perturb


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_tower_isolation(devices, net10):
    """The paper's connectivity: conv2, conv4 and conv5 read only their own tower; conv3, fc6
    and fc7 read both. Noise in tower 0 must reach tower 1 exactly where the paper says."""
    net = net10.place(devices).eval()
    x = images(1)
    with torch.no_grad():
        base = net.trace(x)
        early, late = net.trace(x, edit=_poke_tower0("conv1")), net.trace(x, edit=_poke_tower0("conv3"))
    assert not torch.equal(base["conv2"][0], early["conv2"][0])   # tower 0 sees it
    assert torch.equal(base["conv2"][1], early["conv2"][1])       # tower 1: untouched through LRN, pool, conv2
    assert torch.equal(base["pool2"][1], early["pool2"][1])
    assert not torch.equal(base["conv3"][1], early["conv3"][1])   # conv3 reads both towers
    # after conv3 the towers part again: conv4, conv5 and pool5 of tower 1 never see tower 0
    for name in ("conv4", "conv5", "pool5"):
        assert not torch.equal(base[name][0], late[name][0]), name
        assert torch.equal(base[name][1], late[name][1]), name
    assert not torch.equal(base["fc6"][1], late["fc6"][1])         # fc6 reads both towers


def test_two_devices_equal_one(dropout=0.0):
    """["cpu", "cpu"] runs each tower on its own with the transfer code; ["cpu"] fuses them."""
    x = images(2)
    outs, grads = [], []
    net = small_net(dropout=dropout).train()
    for devices in (["cpu"], ["cpu", "cpu"]):
        net.place(devices).zero_grad(set_to_none=True)
        out = net(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    assert_close_scaled(outs[1], outs[0], 1e-5, "logits")
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert_close_scaled(grads[1][key], grads[0][key], 1e-5, key)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """Equal up to float rounding: max difference within rel x the tensor's largest entry."""
    scale = want.abs().max().item()
    assert scale > 0, what
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= rel * scale, f"{what}: max diff {diff:.3g} vs scale {scale:.3g}"


def test_state_dict_round_trip_across_placements():
    split = small_net().place(["cpu", "cpu"]).eval()
    buf = io.BytesIO()
    torch.save(split.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # a differently initialised net
    fused = AlexNet(AlexNetConfig(num_classes=10)).place(["cpu"]).eval()
    assert list(fused.state_dict()) == list(split.state_dict())
    fused.load_state_dict(torch.load(buf))
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), split(x), rtol=1e-4, atol=1e-5)
    back = small_net(num_classes=10)
    back.load_state_dict(fused.state_dict())
    back.place(["cpu", "cpu"])
    for (k, a), (_, b) in zip(back.state_dict().items(), split.state_dict().items()):
        assert torch.equal(a, b), k


def test_place_returns_self_and_input_device(net10):
    net = net10
    assert net.place(["cpu", "cpu"]) is net
    assert net.input_device == torch.device("cpu")
    assert not net.placement.fused
    assert net.to("cpu").placement.devices == (torch.device("cpu"),) * 2   # .to keeps it consistent


# ---- ablations --------------------------------------------------------------------------

def test_ablation_switches_change_the_function(net10):
    x = images(1)
    with torch.no_grad():
        base = net10.place(["cpu"]).eval()(x)
        assert not torch.allclose(small_net(lrn=False).eval()(x), base)
        assert not torch.allclose(small_net(overlap_pool=False).eval()(x), base)


# ---- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 227, 227), (1, 1, 224, 224), (3, 224, 224)])
def test_wrong_input_shape_is_named(shape, net10):
    net = net10.place(["cpu"])
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\).*got"):
        net(torch.zeros(shape))


def test_integer_input_rejected(net10):
    with pytest.raises(ValueError, match="float"):
        net10.place(["cpu"])(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


@pytest.mark.parametrize("kw, match", [
    (dict(towers=3), "towers"), (dict(dropout=1.0), "dropout"), (dict(init="xavier"), "init"),
    (dict(num_classes=0), "num_classes"), (dict(lrn="yes"), "lrn"), (dict(dropout=True), "dropout")])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        AlexNetConfig(**kw)


def test_unknown_config_option():
    with pytest.raises(TypeError, match="lrn_size"):
        AlexNetConfig(lrn_size=3)
    with pytest.raises(ConfigError, match="lrn_size"):
        from_dict(AlexNetConfig, {"lrn_size": 3})


@pytest.mark.parametrize("devices, match", [
    (["cuda:7"], "cuda:7"), (["cpu", "cuda:5"], "cuda:5"), (["gpu0"], "gpu0"),
    (["cpu", "cpu", "cpu"], "3 devices")])
def test_bad_devices_are_named(devices, match, net10):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many GPUs")
    with pytest.raises(ValueError, match=match):
        net10.place(devices)


def test_single_tower_net_takes_one_device():
    with pytest.raises(ValueError, match="1-tower"):
        small_net(towers=1).place(["cpu", "cpu"])


# ---- bench ------------------------------------------------------------------------------

@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_bench_runs_and_writes_json(tmp_path, amp):
    from bench.model import main
    out = tmp_path / "bench.json"
    assert main(["--batch-size", "1", "--steps", "1", "--repeats", "1", "--warmup", "0",
                 "--amp", amp, "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["versions"]["torch"] == torch.__version__
    assert result["config"]["amp"] == amp
    assert result["optimizer"] is True                     # the default times the SGD step too
    assert set(result["median_images_per_s"]) == {"ours", "reference"}
    assert result["ratio_ours_over_reference"] > 0
    assert main(["--batch-size", "1", "--steps", "1", "--repeats", "1", "--warmup", "0", "--no-optimizer",
                 "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["optimizer"] is False


@pytest.mark.parametrize("optimizer", [True, False])
def test_bench_step_is_the_recipes_sgd_step(optimizer):
    """The timed step updates the weights exactly as the paper's SGD does on its first step
    (v = -lr (g + wd w), w += v: momentum starts from the first gradient), computed here by
    hand; --no-optimizer leaves them alone."""
    from bench.model import make_step
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(4, 3, 2, 2), torch.randint(0, 5, (4,))
    before = [p.detach().clone() for p in net.parameters()]
    nn.functional.cross_entropy(net(x), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    make_step(net, x, y, "none", optimizer)()
    for p, w, g in zip(net.parameters(), before, grads):
        want = w - 0.01 * (g + 5e-4 * w) if optimizer else w
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)
        assert p.grad is None


def test_bench_bad_device_is_an_error(capsys):
    from bench.model import main
    assert main(["--device", "cuda:9", "--no-progress"]) == 2
    assert "cuda:9" in capsys.readouterr().err


# ---- GPU --------------------------------------------------------------------------------

def _gpu_pair() -> list[str]:
    return ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cuda:0"]


@pytest.fixture
def no_tf32():
    """Full fp32 on the GPU, so that split vs fused differ only by summation order."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
def test_gpu_two_devices_equal_one(no_tf32):
    x = images(4)
    outs, grads = [], []
    for devices in (["cuda:0"], _gpu_pair()):
        net = small_net(dropout=0.0).place(devices).train()
        out = net(x.to("cuda:0"))
        out.square().sum().backward()
        outs.append(out.detach().cpu())
        grads.append({k: p.grad.cpu() for k, p in net.named_parameters()})
    # cuDNN picks different algorithms (Winograd, FFT) for grouped and split convolutions:
    # seen up to 1.3e-3 of the largest entry in fp32; a tower wired wrong gives O(1)
    assert_close_scaled(outs[1], outs[0], 5e-3, "logits")
    for key in grads[0]:
        assert_close_scaled(grads[1][key], grads[0][key], 5e-3, key)


@pytest.mark.gpu
def test_gpu_checkpoint_moves_to_cpu_and_back(no_tf32):
    gpu = small_net().place(_gpu_pair()).eval()
    cpu = small_net(num_classes=10)
    cpu.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    x = images(2)
    with torch.no_grad():
        assert_close_scaled(gpu(x.cuda()).cpu(), cpu.eval()(x), 1e-4, "logits")
    assert gpu.input_device == torch.device("cuda:0")


@pytest.mark.gpu
@pytest.mark.parametrize("devices", [["cuda:0"], "pair"])
def test_gpu_bf16_channels_last(devices):
    devices = _gpu_pair() if devices == "pair" else devices
    net = small_net(dropout=0.0).place(devices).to(memory_format=torch.channels_last).train()
    x = images(4).cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = net(x).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16 and out.device == torch.device("cuda:0")
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert (out.float() - want).abs().max() < 0.05 * want.abs().max() + 1e-2


@pytest.mark.gpu
def test_gpu_lrn_channels_last_matches_contiguous():
    x = (torch.randn(2, 96, 13, 13, device="cuda") * 30).requires_grad_()
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    a, b = local_response_norm(x, groups=2), local_response_norm(xc, groups=2)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(x.grad, xc.grad)
