"""Muon (train.optim.name = "muon"): torch.optim.Muon on the hidden matrices, AdamW on the rest, one optimizer
that checkpoints, resumes and shards (FSDP2/TP gather the matrix for the orthogonalisation) like AdamW.

On CPU the orthogonalisation runs in float32 (scalelab's batched Newton-Schulz; torch.optim.Muon always uses
bfloat16, which a CPU without bf16 matrix units runs slower: bench/muon_step.py). The mesh tolerance stays
the one set for bfloat16, where a gradient that differs from the 1-process one in its last float32 bits
(reduction order) can round to a neighbouring bfloat16 value: rel 2e-4 rather than AdamW's 1e-4.
"""

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from scalelab.config import OptimConfig, load_config
from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, GPTConfig
from scalelab.parallel.dist import DistEnv
from scalelab.pipeline import prepare
from scalelab.train.optim import MuonAdamW, ShardedMuon, build_optimizer, default_ns_dtype, orthogonalize, set_lr

MESH_LOSS_TOL = dict(rel=2e-4, abs=1e-5)
STEPS = 4


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, depth=2, aspect_ratio=32, head_dim=16, block_size=16))


def _train(model, opt, steps: int, skip: int = 0) -> list[float]:
    """Losses of ``steps`` steps on the batches that follow the first ``skip`` of a fixed stream."""
    g = torch.Generator().manual_seed(1)
    for _ in range(skip):
        torch.randint(0, 64, (4, 16), generator=g)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 16), generator=g)
        loss = model(x, (x + 1) % 64)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    adam_names = {names[id(p)] for p in opt.adamw.param_groups[0]["params"]}
    muon_names = {names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    assert {"embed.weight", "lm_head.weight", "final_norm.weight", "blocks.0.attn.q_norm.weight"} <= adam_names
    assert all(n.endswith("proj.weight") for n in muon_names) and len(muon_names) == 12
    assert adam_names.isdisjoint(muon_names) and len(adam_names | muon_names) == len(list(model.parameters()))
    set_lr(opt, 5e-4)  # the schedule scales both rates alike
    assert opt.adamw.param_groups[0]["lr"] == 5e-4
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.02 / 1e-3)


NS = ((3.4445, -4.7750, 2.0315), 5, 1e-7)  # torch.optim.Muon's coefficients, steps and eps


def test_sharded_muon_in_bfloat16_is_torch_muon_on_plain_tensors():
    """Same arithmetic as torch's per-matrix loop; only the order of the batched matmuls differs, so a few
    bfloat16 roundings may fall the other way."""
    a, b = _model(), _model()
    ours = ShardedMuon([p for p in a.parameters() if p.dim() == 2], lr=0.02, weight_decay=0.01,
                       ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([p for p in b.parameters() if p.dim() == 2], lr=0.02, weight_decay=0.01)
    assert _train(a, ours, 3) == pytest.approx(_train(b, theirs, 3), rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-4)


def test_orthogonalize_stacks_matrices_and_flattens_their_spectrum():
    torch.manual_seed(0)
    stack = torch.randn(3, 48, 16, dtype=torch.float64)  # tall: iterated on the transpose
    together = orthogonalize(stack, *NS, torch.float64)
    for g, o in zip(stack, together):
        torch.testing.assert_close(orthogonalize(g[None], *NS, torch.float64)[0], o)
        # Muon's quintic does not converge to 1: it pushes every singular value into about [0.7, 1.2]
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.5
    fp32 = orthogonalize(stack.float(), *NS, torch.float32)
    assert fp32.dtype == torch.float32 and (fp32.double() - together).norm() / together.norm() < 1e-4
    bf16 = orthogonalize(stack.float(), *NS, torch.bfloat16)
    assert (bf16.double() - together).norm() / together.norm() < 5e-2


def test_muon_orthogonalises_in_float32_on_cpu_and_bounds_its_stacks():
    assert default_ns_dtype(torch.device("cpu")) == torch.float32
    assert default_ns_dtype(torch.device("cuda")) == torch.bfloat16
    a, b = _model(), _model()
    whole = ShardedMuon([p for p in a.parameters() if p.dim() == 2], lr=0.02)
    assert whole.ns_dtype is None  # per device: float32 here
    one_by_one = ShardedMuon([p for p in b.parameters() if p.dim() == 2], lr=0.02, stack_numel=1)
    updates = [torch.zeros(4, 4)] * 3 + [torch.zeros(8, 4)] * 2
    assert whole._stacks(updates) == [[0, 1, 2], [3, 4]]
    assert one_by_one._stacks(updates) == [[0], [1], [2], [3], [4]]
    assert ShardedMuon([torch.nn.Parameter(torch.zeros(4, 4))], stack_numel=40)._stacks(updates) == [[0, 1], [2], [3], [4]]
    assert _train(a, whole, 3) == pytest.approx(_train(b, one_by_one, 3), rel=1e-5)


def test_muon_ns_dtype_is_a_config_choice():
    params = [torch.nn.Parameter(torch.randn(8, 4))]
    assert build_optimizer(params, OptimConfig(name="muon")).ns_dtype is None
    assert build_optimizer(params, OptimConfig(name="muon", muon_ns_dtype="bfloat16")).ns_dtype == torch.bfloat16


def test_adamw_path_is_plain_torch_adamw():
    a, b = _model(), _model()
    ours = build_optimizer(a, OptimConfig(lr=1e-3))
    assert type(ours) is torch.optim.AdamW
    theirs = torch.optim.AdamW(b.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    assert _train(a, ours, 3) == _train(b, theirs, 3)


def test_muon_learns_and_its_state_round_trips():
    cfg = OptimConfig(name="muon", lr=3e-3, warmup_steps=0)
    straight_model = _model()
    straight = _train(straight_model, build_optimizer(straight_model, cfg), 6)
    assert straight[-1] < straight[0] - 0.3

    model = _model()
    opt = build_optimizer(model, cfg)
    head = _train(model, opt, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
    resumed = _model(seed=5)
    resumed.load_state_dict(state[0])
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(state[1])
    assert opt2.adamw.state is opt2.state and opt2.muon.param_groups[0] is opt2.param_groups[1]
    tail = _train(resumed, opt2, 3, skip=3)
    assert head + tail == straight


def test_muon_over_a_parameter_list_splits_by_shape():
    w, gain = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer([w, gain], OptimConfig(name="muon"))
    assert isinstance(opt, MuonAdamW) and opt.muon.param_groups[0]["params"] == [w]
    assert isinstance(build_optimizer([w], OptimConfig(name="muon")), ShardedMuon)
    assert type(build_optimizer([gain], OptimConfig(name="muon"))) is torch.optim.AdamW


@pytest.mark.parametrize("override, fragment", [
    ("train.optim.name=sgd", "train.optim.name must be one of adamw, muon"),
    ("train.optim.muon_lr=0", "train.optim.muon_lr must be positive"),
    ("train.optim.muon_momentum=1.0", "train.optim.muon_momentum must be in [0, 1)"),
    ("sft.optim.muon_weight_decay=-1", "sft.optim.muon_weight_decay must be >= 0"),
    ("train.optim.muon_ns_dtype=fp16", "train.optim.muon_ns_dtype must be one of auto, float32, bfloat16"),
])
def test_bad_muon_keys_are_one_line_errors(override, fragment):
    with pytest.raises(ScalelabError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_post_training_stages_keep_adamw_unless_they_ask():
    cfg = load_config(None, ["train.optim.name=muon", "train.optim.muon_lr=0.03", "dpo.optim.name=muon"])
    assert cfg.train.optim.name == "muon"
    assert cfg.sft.optim.name == "adamw" and cfg.grpo.optim.name == "adamw"
    assert cfg.dpo.optim.name == "muon" and cfg.dpo.optim.muon_lr == 0.03


def _trainer(overrides: list[str], run_dir: Path, data=None):
    from parallel_worker import make_trainer

    spec = {"overrides": overrides}
    data = data or prepare(load_config(None, overrides), run_dir / "data")
    return make_trainer(spec, (1, 1, 1), DistEnv(), run_dir, data), data


def test_trainer_with_muon_resumes_exactly(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path, steps=6) if not o.startswith("run.out_dir")]
    overrides.append("train.optim.name=muon")
    straight, data = _trainer(overrides, tmp_path / "a")
    losses = straight.fit().losses
    first, _ = _trainer(overrides, tmp_path / "b", data)
    head = first.fit(steps=3).losses
    second, _ = _trainer(overrides, tmp_path / "b", data)
    assert second.resume() and second.step == 3
    assert head + second.fit().losses == losses


# -- the same losses on 2 and 4 gloo processes (slow) -----------------------------------------------


@pytest.fixture(scope="module")
def muon_reference(tmp_path_factory):
    from parallel_worker import make_trainer
    from test_parallel import _overrides

    root = tmp_path_factory.mktemp("muon_mesh")
    spec = {"data_dir": str(root / "data"), "overrides": _overrides() + ["train.optim.name=muon"], "steps": STEPS}
    data = prepare(load_config(None, spec["overrides"]), spec["data_dir"])
    losses = make_trainer(spec, (1, 1, 1), DistEnv(), root / "one", data).fit(steps=STEPS).losses
    return root, spec, losses


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layouts", [
    (2, [[2, 1, 1], [1, 2, 1], [1, 1, 2]]),  # DDP, FSDP2, TP
    (4, [[1, 4, 1], [1, 2, 2], [2, 2, 1]]),  # FSDP2=4, FSDP2 x TP (2-D DTensors), HSDP
])
def test_muon_on_a_mesh_matches_one_process(muon_reference, nproc, layouts):
    from test_parallel import _launch

    root, spec, reference = muon_reference
    out = _launch(nproc, {**spec, "layouts": layouts}, root, f"muon{nproc}")
    assert set(out["losses"]) == {"x".join(map(str, layout)) for layout in layouts}
    for key, losses in out["losses"].items():
        assert losses == pytest.approx(reference, **MESH_LOSS_TOL), key
