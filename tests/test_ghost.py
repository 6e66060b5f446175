"""Ghost bottlenecks (GhostNet, Han et al. CVPR 2020) in the mobilenetv2 family: channel
arithmetic, the paper's Ghost-module MACs against fvcore, the cost table against a direct fvcore
count per position, elastic depth (only identity-shortcut blocks skipped; refusals name the
field), a supernet step on the shipped space, and extract -> export -> runtime agreement."""
from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import SPACES
from exitnas.cli import main
from exitnas.cost import EXTRA_HANDLES, build_cost_table
from exitnas.ghost import GhostBottleneck, GhostModule, make_divisible
from exitnas.space import load_space, parse_space
from exitnas.supernet import Supernet

GHOST = SPACES / "ghostnet_cifar10.yaml"
FREE = ("relu",)  # the only op fvcore may report as uncounted in a Ghost block (cost.py: free)


def _fvcore(module: nn.Module, shape: tuple[int, ...]):
    """A direct fvcore analysis (not exitnas.cost.count_macs) with exitnas's extra handlers,
    eval mode, batch 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module.eval(), torch.zeros(1, *shape))
        analysis.set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.total()
    return analysis


def _counted_everything(analysis) -> bool:
    return all(any(w in op for w in FREE) for op in analysis.unsupported_ops())


# ---- the block ------------------------------------------------------------------------------
@pytest.mark.parametrize("out", [16, 15])
def test_ghost_module_channels_primary_plus_cheap_is_out(out):
    """ceil(out / 2) intrinsic maps from the 1x1 conv, as many cheap ones from the depthwise
    3x3 conv of them, concatenated and cut to ``out``; the first half is the primary output."""
    torch.manual_seed(0)
    gm = GhostModule(in_channels=6, out_channels=out, relu=True).eval()
    m = math.ceil(out / 2)
    primary, cheap = gm.primary[0], gm.cheap[0]
    assert (primary.in_channels, primary.out_channels, primary.kernel_size) == (6, m, (1, 1))
    assert (cheap.in_channels, cheap.out_channels, cheap.groups, cheap.kernel_size) == \
        (m, m, m, (3, 3))
    assert primary.out_channels + cheap.out_channels - out == out % 2  # odd: one cut off
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        y = gm(x)
        p = gm.primary(x)
        c = gm.cheap(p)
    assert y.shape == (2, out, 5, 7)
    assert torch.equal(y[:, :m], p) and torch.equal(y[:, m:], c[:, :out - m])
    assert [type(mod) for mod in GhostModule(in_channels=6, out_channels=out, relu=False)
            .modules()].count(nn.ReLU) == 0


@pytest.mark.parametrize("stride,cin,cout,kernel,se,identity", [
    (1, 16, 16, 3, None, True), (1, 16, 24, 3, None, False), (2, 16, 16, 5, 0.25, False),
    (2, 24, 40, 3, 0.25, False)])
def test_bottleneck_shapes_shortcut_and_options(stride, cin, cout, kernel, se, identity):
    torch.manual_seed(0)
    block = GhostBottleneck(in_channels=cin, channels=cout, stride=stride, expand_ratio=3,
                            kernel=kernel, se=se).eval()
    hidden = cin * 3
    assert block.ghost1.out_channels == hidden and block.ghost2.out_channels == cout
    assert len(block.ghost1.primary) == 3 and len(block.ghost2.primary) == 2  # ReLU: first only
    assert block.has_identity is identity and isinstance(block.shortcut, nn.Identity) is identity
    if not identity:
        dw, pw = block.shortcut[0], block.shortcut[2]
        assert (dw.kernel_size, dw.stride, dw.groups) == ((kernel, kernel), (stride, stride), cin)
        assert (pw.in_channels, pw.out_channels) == (cin, cout)
    assert (block.dw is None) == (stride == 1)
    if stride == 2:
        assert block.dw[0].kernel_size == (kernel, kernel) and block.dw[0].groups == hidden
    assert (block.se is None) == (se is None)
    if se:
        # GhostNet's squeeze width: 48 * 0.25 = 12; 72 * 0.25 = 18 -> 20 (multiples of 4)
        assert block.se.reduce.out_channels == {48: 12, 72: 20}[hidden]
        assert isinstance(block.se.gate, nn.Hardsigmoid)
    x = torch.randn(2, cin, 8, 8)
    with torch.no_grad():
        y = block(x)
    assert y.shape == (2, cout, 8 // stride, 8 // stride)
    if identity:  # the residual really is the input: zero the projection's BN and get x back
        with torch.no_grad():
            for bn in (block.ghost2.primary[1], block.ghost2.cheap[1]):
                bn.weight.zero_()
                bn.bias.zero_()
            assert torch.equal(block(x), x)


def test_make_divisible_is_ghostnets_rounding():
    assert [make_divisible(v) for v in (18, 30, 120 * 0.25, 480 * 0.25, 7, 2, 4.5)] == \
        [20, 32, 32, 120, 8, 4, 8]  # 4.5 -> 4 would be > 10 % down: 8


# ---- costs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [48, 45])
def test_ghost_module_macs_are_the_papers_formula(n):
    """The paper's Ghost-module cost, n/s*h'w'*c*k*k + (s-1)*n/s*h'w'*d*d with k = 1, s = 2,
    d = 3 (n/s rounded up: every cheap map is computed), is fvcore's convolution count exactly;
    its two BatchNorms add fvcore's 2 per element; nothing else is counted or left uncounted."""
    c, h, w, s, d = 24, 8, 6, 2, 3
    gm = GhostModule(in_channels=c, out_channels=n, relu=True)
    a = _fvcore(gm, (c, h, w))
    m = math.ceil(n / s)
    paper = m * h * w * c * 1 * 1 + (s - 1) * m * h * w * d * d
    assert a.by_operator() == {"conv": paper, "batch_norm": 2 * (m * h * w) * 2}
    assert a.total() == paper + 4 * m * h * w
    assert _counted_everything(a)


def _block_args(space):
    """Per position (stage, block): the GhostBottleneck arguments and input shape the space file
    describes, worked out here from the stage list (not from the supernet)."""
    bb, size = space.backbone, space.input.size
    cin, out = bb.stem_channels, {}
    for s, st in enumerate(bb.stages):
        for b in range(max(st.depths)):
            stride = st.stride if b == 0 else 1
            extra = {k: v for k, v in (("kernel", st.kernel), ("se", st.se)) if v is not None}
            out[(s, b)] = (dict(in_channels=cin, channels=st.channels, stride=stride,
                                expand_ratio=st.expand_ratio, **extra), (cin, size, size))
            cin, size = st.channels, size // stride
    return out


def test_cost_table_equals_a_direct_fvcore_count_per_position():
    """Every block MACs of the ghostnet_cifar10 table = fvcore on a GhostBottleneck built from
    that position's stage settings (kernel 5 and SE included); the table's C_k = one fvcore pass
    over a whole extracted model."""
    from test_cost import _whole_model_macs

    space = load_space(GHOST)
    net = Supernet(space, pretrained=False)
    table = build_cost_table(net)
    args = _block_args(space)
    assert sorted(table.blocks) == sorted(args) and len(args) == 16
    for pos, (kw, shape) in args.items():
        a = _fvcore(GhostBottleneck(**kw), shape)
        assert table.blocks[pos] == a.total(), (pos, kw)
        assert _counted_everything(a), a.unsupported_ops()
    plain = dict(args[(2, 0)][0], kernel=3)  # the stride-2, kernel-5, SE block without both
    del plain["se"]
    assert table.blocks[(2, 0)] > _fvcore(GhostBottleneck(**plain), args[(2, 0)][1]).total()
    from exitnas.arch import sample_arch

    rng = random.Random(0)
    for _ in range(2):
        arch = sample_arch(space, rng)
        assert table.exit_costs(arch)[-1] == _whole_model_macs(net.extract(arch), (3, 32, 32))


def test_space_check_and_cost_accept_the_shipped_space(capsys):
    import json

    assert main(["space", "check", str(GHOST)]) == 0
    out = capsys.readouterr().out
    assert ": ok" in out and "mobilenetv2/ghost_bottleneck" in out and "160 depth settings" in out
    assert main(["cost", str(GHOST), "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    table = build_cost_table(Supernet(load_space(GHOST), pretrained=False))
    assert got["backbone_macs"] == table.backbone() == got["exits"][-1]["macs"]


# ---- elastic depth --------------------------------------------------------------------------
def test_only_blocks_with_identity_shortcuts_are_skippable():
    """As for the inverted residual: a stage's first block (here: a stride or width change, or
    the stem's width) always runs; every later one has an identity shortcut and may be
    skipped, and skipping it changes nothing downstream of the blocks that ran."""
    space = load_space(GHOST)
    net = Supernet(space, pretrained=False).eval()
    st = net.structure
    for s, stage in enumerate(net.stages):
        assert st.min_depth(s) == 1
        for b, block in enumerate(stage):
            assert st.skippable[s][b] == (b > 0)
            if st.skippable[s][b]:
                assert block.has_identity
            kw = _block_args(space)[(s, b)][0]
            assert block.has_identity == (kw["stride"] == 1 and kw["in_channels"] == kw["channels"])
    assert sum(not blk.has_identity for stage in net.stages for blk in stage) == 5  # stages 1..5
    x = torch.randn(2, 3, 32, 32)
    short = (1, 1, 2, 2, 1, 3)
    with torch.no_grad():
        before = [net.forward_exits(x, d, [])[-1] for d in (short, space.max_depths)]
        net.stages[3][3].ghost1.primary[0].weight.fill_(3.0)  # a block the short net skips
        after = [net.forward_exits(x, d, [])[-1] for d in (short, space.max_depths)]
    assert torch.equal(before[0], after[0])
    assert not torch.equal(before[1], after[1])  # at full depth the block does run
    from exitnas.errors import ConfigError

    with pytest.raises(ConfigError) as info:  # the Structure's own rule: block 0 always runs
        st.check_depths([[1], [1, 2], [0, 1, 2], [1], [1], [1]], path="backbone.stages")
    assert info.value.path == "backbone.stages[2]"
    assert info.value.detail.startswith("depth 0 is outside 1..2")


def _edited(tmp_path, old: str, new: str):
    text = GHOST.read_text()
    assert text.count(old) == 1
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("old,new,message", [
    ("{channels: 40, stride: 2, depths: [1, 2]", "{channels: 40, stride: 2, depths: [0, 1, 2]",
     "backbone.stages[2].depths: 0 is not >= 1"),
    ("kernel: 5, se: 0.25}\n    - {channels: 80", "kernel: 4, se: 0.25}\n    - {channels: 80",
     "backbone.stages[2].kernel: unknown value 4 (known: 3, 5, 7)"),
    ("block: ghost_bottleneck", "block: inverted_residual",
     "backbone.stages[2].kernel: block 'inverted_residual' has no 'kernel' setting"),
    ("family: mobilenetv2", "family: resnet",
     "backbone.block: block 'ghost_bottleneck' does not belong to family 'resnet'"),
])
def test_refusals_are_one_line_with_the_field_path(tmp_path, capsys, old, new, message):
    """A first block cannot be skipped (depth 0), a kernel outside 3/5/7, Ghost settings on a
    block that has none, a Ghost block in the resnet family: exit 2, one line, the field."""
    path = _edited(tmp_path, old, new)
    assert main(["space", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"exitnas: error: {path}: ") and message in err, err


def test_fingerprints_of_older_spaces_ignore_the_unset_ghost_settings():
    """kernel / se unset leave a space's fingerprint as it was; set, they change it."""
    space = load_space(SPACES / "mobilenetv2_cifar.yaml")
    assert space.fingerprint == "7a6cb4593a0c69eb"  # test_space's pinned value
    ghost = load_space(GHOST)
    stages = yaml.safe_load(GHOST.read_text())["backbone"]["stages"]
    stages[0]["se"] = 0.5
    assert ghost.with_overrides({"backbone.stages": stages}).fingerprint != ghost.fingerprint


# ---- training and deployment ----------------------------------------------------------------
def test_a_supernet_on_the_space_trains_one_step():
    from exitnas.train import SandwichStep

    torch.manual_seed(0)
    space = load_space(GHOST)
    net = Supernet(space, pretrained=False)
    step = SandwichStep(net, distill=True, temperature=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    total, largest = step(x, y, [space.min_depths])
    assert torch.isfinite(total) and torch.isfinite(largest)
    opt.zero_grad()
    total.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        if name.endswith(".mix_logit") and name.startswith("heads.s5"):
            continue  # sdn_pool on a 4x4 map: max pool = avg pool, so d/d mix is exactly 0
        assert p.grad.abs().sum() > 0, name
    opt.step()
    moved = [k for k, v in net.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("stages.5.4.se.") for k in moved)
    assert any(k.startswith("stages.2.0.shortcut.") for k in moved)


SMALL = {
    "name": "ghost_small", "num_classes": 4, "input": {"channels": 3, "size": 16},
    "backbone": {"family": "mobilenetv2", "block": "ghost_bottleneck", "stem_channels": 8,
                 "stages": [{"channels": 8, "stride": 1, "depths": [1, 2], "expand_ratio": 2},
                            {"channels": 12, "stride": 2, "depths": [1, 2], "expand_ratio": 3,
                             "kernel": 5, "se": 0.25}]},
    "exits": {"heads": ["linear", "sdn_pool", "conv", "mlp"], "max_exits": 2},
    "data": {"dataset": "synthetic", "synthetic_size": 128, "batch_size": 32,
             "eval_batch_size": 64},
    "supernet": {"init": "scratch", "bn_calib_batches": 2},
}


@pytest.fixture(scope="module")
def ghost_export(tmp_path_factory) -> dict:
    """A supernet of Ghost blocks (SE, kernel 5, conv shortcut) saved in a run directory, one
    arch with two exits and thresholds that send samples to every exit, the in-repo model
    (extracted after the BN re-estimation export uses) and its export (ONNX too when the extra
    is installed), made once."""
    from test_export import HAVE_ONNX

    from exitnas.arch import Arch
    from exitnas.data import load_splits, normalize
    from exitnas.export import export_run
    from exitnas.policy import ExitStats
    from exitnas.rundir import RunDir
    from exitnas.supernet import calibration_batches

    tmp = tmp_path_factory.mktemp("ghost_export")
    space = parse_space(SMALL)
    run = RunDir(tmp / "run")
    run.init(space)
    splits = load_splits(space)
    torch.manual_seed(0)
    net = Supernet(space)
    for m in net.modules():  # spread the untrained logits so confidences differ per sample
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=2.0)
    net.save(run.sub("supernet") / "weights.safetensors")
    x = normalize(torch.cat([splits.test.images, splits.val.images]), splits.mean, splits.std)
    probe = Arch.parse("d2.2~s0b1=sdn_pool,s1b0=conv~max_softmax=0.5,0.5").validate(space)
    with torch.no_grad():
        conf = ExitStats.stack(net.extract(probe, calib=calibration_batches(space, splits))
                               .eval().forward_exits(x)).conf
    t0 = float(np.quantile(conf[0].numpy(), 0.6))
    t1 = float(np.quantile(conf[1][conf[0] < t0].numpy(), 0.5))
    arch = probe.with_thresholds((round(t0, 4), round(t1, 4)))
    model = net.extract(arch, calib=calibration_batches(space, splits)).eval()
    out = export_run(run, arch, tmp / "export", onnx=HAVE_ONNX).out
    return {"net": net, "arch": arch, "model": model, "x": x, "out": out}


@pytest.mark.parametrize("backend", ["pt2", "onnx"])
def test_extract_export_runtime_agree_with_the_model(ghost_export, backend):
    """The runtime's predictions, exits and per-sample MACs equal the in-repo model's and the
    cost table's, on both backends."""
    from test_export import HAVE_ONNX

    if backend == "onnx" and not HAVE_ONNX:
        pytest.skip("the onnx extra (onnx, onnxscript, onnxruntime) is not installed")
    from exitnas.runtime import load

    net, arch, model, x = (ghost_export[k] for k in ("net", "arch", "model", "x"))
    got = load(ghost_export["out"], backend=backend).predict(x if backend == "pt2" else x.numpy())
    ref = model.predict(x)
    assert np.array_equal(got.pred, ref.pred.numpy())
    assert np.array_equal(got.exit, ref.exit.numpy())
    assert np.bincount(got.exit, minlength=3).min() >= 5  # every exit is really taken
    costs = build_cost_table(net).exit_costs(arch)
    assert np.array_equal(got.cost, np.asarray(costs)[got.exit])
