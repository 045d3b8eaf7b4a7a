"""The training loss (CLaMP 3's and the normalised variant, false-negative masking), gradient caching
and the multi-process helpers: gathered features and averaged gradients equal one process on the
global batch, and a failing rank ends the job."""

from __future__ import annotations

import math

import pytest
import torch
from dist_loss_worker import SCENARIOS, MusicTower, TextTower, build_towers, make_batch, run_scenario
from helpers import REPO_ROOT, torchrun
from training import distributed
from training.loss import ContrastiveLoss, contrastive_step, split_batch

WORKER = REPO_ROOT / "tests" / "dist_loss_worker.py"


def features(rows: int = 5, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator)


def brute_force_loss(text: torch.Tensor, music: torch.Tensor, scale: float,
                     excluded: set[tuple[int, int]] = frozenset()) -> float:
    """Symmetric InfoNCE written out term by term in float64; ``excluded`` holds (text, music)
    pairs left out of both softmax denominators."""
    t, m = text.double().tolist(), music.double().tolist()
    n = len(t)

    def logit(i: int, j: int) -> float:
        return scale * sum(a * b for a, b in zip(t[i], m[j], strict=True))

    text_to_music = music_to_text = 0.0
    for i in range(n):
        kept = [j for j in range(n) if (i, j) not in excluded]
        text_to_music += -logit(i, i) + math.log(sum(math.exp(logit(i, j)) for j in kept))
        kept = [j for j in range(n) if (j, i) not in excluded]
        music_to_text += -logit(i, i) + math.log(sum(math.exp(logit(j, i)) for j in kept))
    return (text_to_music / n + music_to_text / n) / 2


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_default_loss_is_clamp3s_symmetric_cross_entropy_on_raw_features() -> None:
    text, music = features()
    loss_fn = ContrastiveLoss()
    assert loss_fn.temperature_parameter is None and not loss_fn.learnable and list(loss_fn.parameters()) == []
    with pytest.raises(ValueError, match="unknown loss"):
        ContrastiveLoss("infonce")
    assert loss_fn(text, music).item() == pytest.approx(brute_force_loss(text, music, 1.0), abs=1e-5)


def test_normalized_loss_has_a_learnable_capped_temperature() -> None:
    text, music = features()
    loss_fn = ContrastiveLoss("normalized")
    parameter = loss_fn.temperature_parameter
    assert parameter is not None and parameter.requires_grad and loss_fn.learnable
    assert dict(loss_fn.named_parameters()) == {"log_logit_scale": parameter}
    assert "log_logit_scale" in loss_fn.state_dict()
    assert parameter.item() == pytest.approx(math.log(1 / 0.07))
    expected = brute_force_loss(unit(text), unit(music), 1 / 0.07)
    assert loss_fn(text, music).item() == pytest.approx(expected, abs=1e-5)

    with torch.no_grad():
        parameter.fill_(math.log(250.0))
    assert loss_fn.scale().item() == pytest.approx(100.0)
    assert loss_fn(text, music).item() == pytest.approx(brute_force_loss(unit(text), unit(music), 100.0), abs=1e-4)


def test_rows_sharing_a_key_are_not_negatives() -> None:
    text, music = features(rows=4)
    # rows 0 and 2 share a text; rows 1 and 3 share a piece of music
    text_keys, music_keys = torch.tensor([7, 8, 7, 9]), torch.tensor([0, 5, 1, 5])
    excluded = {(0, 2), (2, 0), (1, 3), (3, 1)}
    expected = brute_force_loss(text, music, 1.0, excluded)
    assert abs(expected - brute_force_loss(text, music, 1.0)) > 1e-3  # the masking matters here

    text.requires_grad_(True)
    loss = ContrastiveLoss()(text, music, text_keys=text_keys, music_keys=music_keys)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(text.grad).all()

    only_text = ContrastiveLoss()(text, music, text_keys=text_keys)
    assert only_text.item() == pytest.approx(brute_force_loss(text, music, 1.0, {(0, 2), (2, 0)}), abs=1e-5)


def test_loss_runs_in_float32_under_autocast() -> None:
    text, music = features(rows=6, dim=16)
    for variant in ("clamp3", "normalized"):
        loss_fn = ContrastiveLoss(variant)
        reference = loss_fn(text, music)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = loss_fn(text, music)
        assert autocast.dtype == torch.float32
        assert autocast.item() == pytest.approx(reference.item(), abs=1e-6)


def test_split_batch_slices_tensors_and_lists_and_shares_the_rest() -> None:
    batch = {"x": torch.arange(10).reshape(5, 2), "ids": list("abcde"), "format": "abc"}
    chunks = split_batch(batch, 2)
    assert [len(chunk["ids"]) for chunk in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([chunk["x"] for chunk in chunks]), batch["x"])
    assert chunks[2]["ids"] == ["e"] and all(chunk["format"] == "abc" for chunk in chunks)
    with pytest.raises(ValueError, match="disagree"):
        split_batch({"x": torch.zeros(3), "y": torch.zeros(4)}, 2)


def grads_of(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{index}.{name}": p.grad.clone() for index, module in enumerate(modules)
            for name, p in module.named_parameters() if p.grad is not None}


def reference_with_matching_dropout(batch: dict[str, torch.Tensor], music_tower: MusicTower, text_tower: TextTower,
                                    loss_fn: ContrastiveLoss, micro_batch: int,
                                    text_trains: bool, fixed_text: torch.Tensor | None) -> float:
    """Plain autograd through the whole batch, encoded micro-batch by micro-batch in GradCache's order
    (music first, then text), so every dropout mask is drawn as GradCache draws it."""
    chunks = split_batch(batch, micro_batch)
    music = torch.cat([music_tower(chunk) for chunk in chunks])
    text = torch.cat([text_tower(chunk) for chunk in chunks]) if text_trains else fixed_text
    loss = loss_fn(text, music, text_keys=batch["text_keys"], music_keys=batch["music_keys"])
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("text_trains", [False, True], ids=["music_only", "both_sides"])
def test_grad_cache_gradient_equals_full_batch_gradient_with_dropout(text_trains: bool) -> None:
    batch = make_batch()
    results = []
    for cached in (True, False):
        music_tower, text_tower = build_towers(dropout=0.1)
        loss_fn = ContrastiveLoss("normalized")
        fixed_text = None
        if not text_trains:
            with torch.no_grad():
                fixed_text = text_tower.eval()(batch)
        torch.manual_seed(123)
        if cached:
            loss = contrastive_step(batch, music_tower, text_tower if text_trains else fixed_text, loss_fn,
                                    micro_batch=3, text_keys=batch["text_keys"], music_keys=batch["music_keys"])
        else:
            loss = reference_with_matching_dropout(batch, music_tower, text_tower, loss_fn, 3, text_trains,
                                                   fixed_text)
        results.append((loss, grads_of(music_tower, text_tower, loss_fn), torch.get_rng_state()))
    (cached_loss, cached_grads, cached_rng), (loss, grads, rng) = results
    assert cached_loss == pytest.approx(loss, abs=1e-6)
    assert cached_grads.keys() == grads.keys()
    assert any(name.startswith("2.") for name in grads)  # the temperature has its gradient
    assert any(name.startswith("1.") for name in grads) == text_trains
    for name, grad in grads.items():
        assert torch.allclose(cached_grads[name], grad, atol=1e-5, rtol=0), name
    assert torch.equal(cached_rng, rng)  # the RNG stream continues as without caching

    # Other dropout masks give another gradient, so the comparison above does depend on the masks.
    music_tower, text_tower = build_towers(dropout=0.1)
    torch.manual_seed(321)
    reference_with_matching_dropout(batch, music_tower, text_tower, ContrastiveLoss("normalized"), 3,
                                    text_trains, fixed_text)
    other = grads_of(music_tower)
    assert max((other[name] - grads[name]).abs().max().item() for name in other) > 1e-4


def test_grad_cache_without_dropout_equals_one_pass_over_the_batch() -> None:
    batch = make_batch()
    one_pass = run_scenario(batch, normalized=False, text_trains=True, micro_batch=0)
    cached = run_scenario(batch, normalized=False, text_trains=True, micro_batch=3)
    assert cached["loss"] == pytest.approx(one_pass["loss"], abs=1e-6)
    for name, grad in one_pass["grads"].items():
        assert torch.allclose(cached["grads"][name], grad, atol=1e-5, rtol=0), name


def test_a_grad_scaler_scales_the_cached_gradients() -> None:
    batch = make_batch()
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=8.0)):
        music_tower, text_tower = build_towers(dropout=0.0)
        contrastive_step(batch, music_tower, text_tower, ContrastiveLoss(), micro_batch=3, scaler=scaler)
        grads.append(grads_of(music_tower, text_tower))
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], 8 * grad, atol=1e-5, rtol=0), name


def test_single_process_helpers_are_identities() -> None:
    assert distributed.launch_environment({}) == (0, 1, 0)
    assert distributed.launch_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK"):
        distributed.launch_environment({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        distributed.launch_environment({"WORLD_SIZE": "two"})
    context = distributed.init_distributed("cpu", environ={})
    assert (context.rank, context.world_size, context.is_main, context.enabled) == (0, 1, True, False)
    assert context.device == torch.device("cpu") and not torch.distributed.is_initialized()

    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert torch.equal(distributed.all_gather_tensor(x), x)
    assert distributed.all_reduce_mean(2.5) == 2.5 and distributed.broadcast_object([1]) == [1]
    assert distributed.all_gather_object("x") == ["x"]
    assert distributed.run_distributed(lambda context: context.world_size, "cpu") == 1
    with pytest.raises(ZeroDivisionError):  # one plain process: exceptions as usual
        distributed.run_distributed(lambda context: 1 / 0, "cpu")
    assert distributed.seed_everything(42, rank=2) == 44
    first = torch.rand(3)
    distributed.seed_everything(42, rank=2)
    assert torch.equal(torch.rand(3), first)




@pytest.mark.slow  # a torchrun job
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path) -> None:
    done = torchrun(WORKER, 2, ["equivalence", str(tmp_path)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]

    batch = make_batch()
    for name, normalized, text_trains, _ in SCENARIOS:
        single = run_scenario(batch, normalized, text_trains, micro_batch=0)
        for result in (ranks[0][name], ranks[1][name]):
            assert result["loss"] == pytest.approx(single["loss"], abs=1e-5), name
            assert result["grads"].keys() == single["grads"].keys(), name
            for key, grad in single["grads"].items():
                assert torch.allclose(result["grads"][key], grad, atol=1e-5, rtol=0), (name, key)

    for result in ranks:
        assert torch.equal(result["only_rank0_grad"], torch.full((3,), 0.5))
        assert result["nowhere_grad"] is None
        assert result["gathered_unequal"].tolist() == [[0, 0], [1, 1], [1, 1]]
        assert result["mean_rank"] == 0.5
        assert result["broadcast"] == {"from": 0}
        assert result["objects"] == ["rank 0", "rank 1"]


@pytest.mark.slow  # a torchrun job
def test_a_failing_rank_ends_the_job_without_hanging() -> None:
    done = torchrun(WORKER, 2, ["fail"], timeout=90)  # a hang would raise TimeoutExpired here
    assert done.returncode != 0
    assert "[rank 1/2] failed" in done.stderr and "deliberate failure on one rank" in done.stderr
