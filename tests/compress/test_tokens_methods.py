"""EViT, ToMe and DiffRate against naive per-image references, plus the patch API and its errors.

Each reference re-implements the method from its paper/official code with Python loops over one
image at a time (explicit softmax attention, sorted() rankings, dict-based merge groups), so it
shares no code with the batched, static-shape implementation under test.
"""
import copy
import math
import re
import warnings
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

import leanvit.tokens as tokens
from leanvit.compress.tokens.patch import model_tokens
from leanvit.errors import LeanvitError
from leanvit.profile import count_macs
from random_vit import randomised

torch.set_num_threads(1)

DEPTH = 6


@pytest.fixture(scope="module", params=["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def vit(request):
    """A 6-block ViT at 32x32 with 4x4 patches: 64 patch tokens plus the class (and distillation) token."""
    torch.manual_seed(0)
    return timm.create_model(request.param, img_size=32, patch_size=4, embed_dim=48, depth=DEPTH,
                             num_heads=3, num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def reduced(model, method):
    return tokens.apply(copy.deepcopy(model), method)


# ---------------------------------------------------------------------------------------------
# Per-image references


def _attention(attn, x, size=None):
    """Explicit multi-head attention on one image's tokens (N, C): output, weights (H, N, N), keys."""
    n, _ = x.shape
    q, k, v = attn.qkv(x).view(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if size is not None:
        logits = logits + size.log()
    w = logits.softmax(dim=-1)
    return attn.proj((w @ v).transpose(0, 1).reshape(n, -1)), w, k


def _embed(model, image):
    return model._pos_embed(model.patch_embed(image[None]))[0]


def _head(model, x):
    return model.forward_head(model.norm(x)[None])[0]


def evit_reference(model, image, keep_rate, layers, fuse):
    p = model.num_prefix_tokens
    x = _embed(model, image)
    for i, blk in enumerate(model.blocks):
        h, w, _ = _attention(blk.attn, blk.norm1(x))
        x = x + h
        n = len(x) - p
        kept = math.ceil(keep_rate * n)
        if i in layers and kept < n:
            cls_attn = w[:, 0, p:].mean(0)
            ranked = sorted(range(n), key=lambda j: -cls_attn[j].item())
            rows = [x[:p]] + [x[p + j][None] for j in ranked[:kept]]
            if fuse:
                rows.append(sum(cls_attn[j] * x[p + j] for j in ranked[kept:])[None])
            x = torch.cat(rows)
        x = x + blk.mlp(blk.norm2(x))
    return _head(model, x)


def tome_reference(model, image, schedule, prop_attn=True):
    p = model.num_prefix_tokens
    x = _embed(model, image)
    size = torch.ones(len(x))
    for blk, r in zip(model.blocks, schedule):
        h, _, k = _attention(blk.attn, blk.norm1(x), size if prop_attn else None)
        x = x + h
        if r:
            x, size = _tome_merge(x, size, k, r, p)
        x = x + blk.mlp(blk.norm2(x))
    return _head(model, x)


def _tome_merge(x, size, k, r, p):
    """Bipartite soft matching: even positions (A) into their most similar odd position (B)."""
    metric = k.mean(0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    set_b = [t for t in range(1, len(x), 2) if t >= p]
    best = {}
    for a in range(0, len(x), 2):
        if a >= p:
            sims = metric[set_b] @ metric[a]
            best[a] = (sims.max().item(), set_b[int(sims.argmax())])
    merged = sorted(best, key=lambda a: -best[a][0])[:r]
    groups = {t: [t] for t in range(len(x)) if t not in merged}
    for a in merged:
        groups[best[a][1]].append(a)
    # ToMe's output order, which decides the next block's A/B split: prefix tokens, then the
    # unmerged A tokens, then the B tokens
    order = list(range(p)) + [t for t in range(0, len(x), 2) if t >= p and t not in merged] + set_b
    size_new = torch.stack([size[groups[t]].sum() for t in order])
    x_new = torch.stack([(size[groups[t], None] * x[groups[t]]).sum(0) for t in order]) / size_new[:, None]
    return x_new, size_new


def diffrate_reference(model, image, prune, merge):
    p = model.num_prefix_tokens
    x = _embed(model, image)
    size = torch.ones(len(x))
    for i, blk in enumerate(model.blocks):
        h, w, _ = _attention(blk.attn, blk.norm1(x), size)
        x = x + h
        keep = min(len(x), prune[i])
        kept = min(keep, merge[i])
        if kept < len(x):
            cls_attn = w[:, 0, p:].mean(0)
            order = list(range(p)) + [p + j for j in sorted(range(len(x) - p), key=lambda j: -cls_attn[j].item())]
            x, size = x[order[:keep]], size[order[:keep]]
            unit = x / x.norm(dim=-1, keepdim=True)
            total, count, size_new = list(x[:kept]), [1] * kept, list(size[:kept])
            for s in range(kept, keep):
                sims = unit[p:kept] @ unit[s]
                d = p + int(sims.argmax())
                total[d] = total[d] + x[s]
                count[d] += 1
                size_new[d] = size_new[d] + size[s] * max(sims.max().item(), 0.0)
            x = torch.stack([t / c for t, c in zip(total, count)])
            size = torch.stack(size_new)
        x = x + blk.mlp(blk.norm2(x))
    return _head(model, x)


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("keep_rate,layers,fuse", [(0.7, (1, 3, 4), True), (0.5, (0, 2), False)])
def test_evit_matches_reference(vit, images, keep_rate, layers, fuse):
    out = reduced(vit, tokens.EViT(keep_rate=keep_rate, fuse=fuse, layers=layers))(images)
    ref = torch.stack([evit_reference(vit, img, keep_rate, layers, fuse) for img in images])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("r", [5, (8, 0, 3, 6)])
def test_tome_matches_reference(vit, images, r):
    out = reduced(vit, tokens.ToMe(r=r))(images)
    schedule = [r] * DEPTH if isinstance(r, int) else list(r) + [0] * (DEPTH - len(r))
    ref = torch.stack([tome_reference(vit, img, schedule) for img in images])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_tome_without_proportional_attention_matches_reference(vit, images):
    """``prop_attn=False`` (train's --no-tome-prop-attn, official ToMe's training): merged tokens weigh as one in
    attention, no log-size bias, and the logits differ from the default's."""
    out = reduced(vit, tokens.ToMe(r=5, prop_attn=False))(images)
    ref = torch.stack([tome_reference(vit, img, [5] * DEPTH, prop_attn=False) for img in images])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out, reduced(vit, tokens.ToMe(r=5))(images), atol=1e-3)


def test_diffrate_merges_add_sizes_weighted_by_their_similarity_clamped_at_zero():
    """A merged token adds its size times its similarity to the destination, never less than nothing: an
    anti-parallel token (similarity -1) would shrink its destination's size, and with it its weight in attention."""
    from leanvit.compress.tokens.diffrate import _merge_tail

    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 2.0]]])
    merged, size = _merge_tail(x, None, torch.tensor([[-1.0, 0.5]]), torch.tensor([[1, 1]]), kept=2)
    assert size.flatten().tolist() == [1.0, 1.5]
    torch.testing.assert_close(merged, torch.tensor([[[1.0, 0.0], [0.0, 2 / 3]]]))


@torch.no_grad()
def test_diffrate_matches_reference(vit, images):
    n = 64 + vit.num_prefix_tokens
    prune = (n, n - 2, 50, 44, 30, 12)
    merge = (n, n - 9, 46, 44, 21, 12)
    out = reduced(vit, tokens.DiffRate(prune=prune, merge=merge))(images)
    ref = torch.stack([diffrate_reference(vit, img, prune, merge) for img in images])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("method", [tokens.EViT(keep_rate=1.0, layers=(1, 2)), tokens.ToMe(r=0),
                                    tokens.DiffRate(prune=(200,) * DEPTH, merge=(200,) * DEPTH)])
def test_no_reduction_is_the_original_model(vit, images, method):
    torch.testing.assert_close(reduced(vit, method)(images), vit(images), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_token_counts_follow_each_method(vit):
    p, n = vit.num_prefix_tokens, 64 + vit.num_prefix_tokens
    evit = reduced(vit, tokens.EViT(keep_rate=0.5, fuse=True, layers=(1, 4)))
    assert tokens.token_counts(evit) == [n, p + 32 + 1, p + 33, p + 33, p + 17 + 1, p + 18]
    tome = reduced(vit, tokens.ToMe(r=4))
    assert tokens.token_counts(tome) == [n - 4 * (i + 1) for i in range(DEPTH)]  # (the forward's: below)


def test_deit_small_matches_the_papers():
    """EViT README: keep 0.9 / 0.7 / 0.5 with fusion -> 4.0 / 3.0 / 2.3 GMACs, and 196 patch tokens
    -> 138+1 -> 98+1 -> 70+1 at 0.7; DiffRate's published DeiT-S rates for 2.9 GMACs."""
    model = timm.create_model("deit_small_patch16_224").eval()
    full = count_macs(model, (3, 224, 224))
    for keep_rate, gmacs in [(0.9, 4.0), (0.7, 3.0), (0.5, 2.3)]:
        tokens.apply(model, tokens.EViT(keep_rate=keep_rate, fuse=True, layers=(3, 6, 9)))
        assert count_macs(model, (3, 224, 224)) == pytest.approx(gmacs * 1e9, rel=0.03)
    tokens.apply(model, tokens.EViT(keep_rate=0.7))
    assert tokens.token_counts(model)[::3] == [197, 1 + 138 + 1, 1 + 98 + 1, 1 + 70 + 1]
    assert count_macs(model, (3, 224, 224)) <= 0.7 * full  # the bar: at least 30 % fewer MACs
    tokens.apply(model, tokens.from_spec("diffrate:2.9"))
    assert count_macs(model, (3, 224, 224)) == pytest.approx(2.9e9, rel=0.01)


def test_remove_restores_the_model(vit, images):
    model = copy.deepcopy(vit)
    blocks, keys = model.blocks, list(model.state_dict())
    tokens.apply(model, tokens.ToMe(r=3))
    assert list(model.state_dict()) == keys  # checkpoints load into the reduced model unchanged
    tokens.apply(model, tokens.EViT(keep_rate=0.5, layers=(2,)))  # replaces, does not stack
    assert isinstance(tokens.applied(model), tokens.EViT)
    tokens.remove(model)
    assert model.blocks is blocks and tokens.applied(model) is None
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit(images))
    assert not model._forward_pre_hooks


@torch.no_grad()
def test_intermediates_run_the_original_blocks(vit, images):
    model = reduced(vit, tokens.ToMe(r=3))
    got = model.forward_intermediates(images, indices=2, intermediates_only=True)
    for g, w in zip(got, vit.forward_intermediates(images, indices=2, intermediates_only=True), strict=True):
        torch.testing.assert_close(g, w)


def test_reduced_model_trains(vit, images):
    model = reduced(vit, tokens.EViT(keep_rate=0.5, layers=(1, 3))).train()
    model(images).logsumexp(-1).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_keep_rate_warmup_drives_the_applied_evit(vit, images):
    model = reduced(vit, tokens.EViT(keep_rate=0.5, layers=(1, 4))).train()
    target = tokens.token_counts(model)
    hook = tokens.keep_rate_warmup(model, steps_per_epoch=10, start_epoch=1, shrink_epochs=2)
    assert hook(0) == 1.0 and hook(10) == 1.0
    torch.testing.assert_close(model(images), vit(images))  # keep rate 1: nothing dropped
    assert hook(20) == pytest.approx(0.75)  # half-way down the cosine
    torch.testing.assert_close(model(images), reduced(vit, tokens.EViT(keep_rate=0.75, layers=(1, 4)))(images))
    assert hook(30) == 0.5 and hook(1000) == 0.5
    assert model.blocks.train_method is None and tokens.token_counts(model) == target


def test_keep_rate_warmup_leaves_evaluation_at_the_target(vit, images):
    """Official EViT passes the scheduled rate to the training forward only; eval runs at the model's keep rate."""
    method = tokens.EViT(keep_rate=0.5, layers=(1, 4))
    model, at_target = reduced(vit, method), reduced(vit, method).eval()
    hook = tokens.keep_rate_warmup(model, steps_per_epoch=10, start_epoch=1, shrink_epochs=2)
    for step in (5, 20):  # before the cosine (keep rate 1) and half-way down it (0.75)
        hook(step)
        assert model.train()(images).shape == (3, 10)
        torch.testing.assert_close(model.eval()(images), at_target(images))
        assert tokens.applied(model) == method and tokens.token_counts(model) == tokens.token_counts(at_target)
    hook(5)
    torch.testing.assert_close(model.train()(images), vit(images))  # training mode: the warm-up's keep rate 1


def test_tome_schedule_with_the_papers_inflection():
    """Official ToMe's r=(16, -1): a decreasing schedule, about 16 per block on average."""
    assert tokens.ToMe(r=16, inflect=-1).schedule(12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert tokens.ToMe(r=16, inflect=1).schedule(12)[::11] == [0, 32]
    assert tokens.ToMe(r=8).schedule(3) == [8, 8, 8] and tokens.ToMe(r=(2, 1, 1)).schedule(4) == [2, 1, 1, 0]
    for ported in [(16, -1), (8, 0), (16, -0.5)]:  # official (r, inflection) tuples: not silently two blocks' counts
        with pytest.raises(LeanvitError, match=rf"ambiguous.*ToMe\(r={ported[0]}, inflect={ported[1]}\)"):
            tokens.ToMe(r=ported)
    with pytest.raises(LeanvitError, match="inflect must be in"):
        tokens.ToMe(r=8, inflect=2)


@pytest.mark.parametrize("spec,counts", [("1x2", (1, 1)), ("2,1", (2, 1)), ("2,0", (2, 0)), ("0,1", (0, 1))])
def test_parsed_two_block_specs_are_per_block_counts(vit, spec, counts):
    """Only a 2-tuple written straight into ToMe(r=...) can be a ported official (r, inflection)."""
    method = tokens.from_spec(f"tome:{spec}")
    assert method == tokens.ToMe(r=tokens.parse_r(spec)) and method.schedule(4) == [*counts, 0, 0]
    assert method.r == counts and repr(method).startswith(f"ToMe(r={counts}")
    n = 64 + vit.num_prefix_tokens
    assert tokens.token_counts(reduced(vit, method)) == [n - counts[0], n - sum(counts)] + [n - sum(counts)] * 4
    with pytest.raises(LeanvitError, match=rf"ambiguous.*ToMe\(r=\({counts[0]}, {counts[1]}, 0\)\) for two blocks"):
        tokens.ToMe(r=counts)


def test_from_spec():
    assert tokens.from_spec("evit:0.7") == tokens.EViT(keep_rate=0.7)
    assert tokens.from_spec("ToMe:8") == tokens.ToMe(r=8)
    assert tokens.from_spec("diffrate:2.9").target_macs == pytest.approx(2.9e9)
    assert tokens.from_spec("evit:0.5", fuse=False).fuse is False
    assert tokens.from_spec("tome:1x3") == tokens.ToMe(r=(1, 1, 1))
    assert tokens.from_spec("tome:0,2,2,1") == tokens.ToMe(r=(0, 2, 2, 1))


@pytest.mark.parametrize("spec,match", [("evt:0.7", "evit"), ("tome:8.5", "expected R"), ("tome:1x", "RxK"), ("tome:1,a", "per block"),
                                       ("evit", "has no value: write evit:VALUE, e.g. evit:0.7"),
                                       ("tme:8", r"Unknown token spec 'tme:8' \(did you mean tome\?\)"),
                                       ("evit:abc", "Token spec 'evit:abc': expected a number after 'evit:', got 'abc'"),
                                       ("diffrate:", "expected a number after 'diffrate:', got ''")])
def test_bad_spec(spec, match):
    with pytest.raises(LeanvitError, match=match):
        tokens.from_spec(spec)


@pytest.mark.parametrize("keep_rate", [0.0, -0.1, 1.2])
def test_keep_rate_outside_unit_interval(keep_rate):
    with pytest.raises(LeanvitError, match=r"keep_rate must be in \(0, 1\]"):
        tokens.EViT(keep_rate=keep_rate)


def test_r_too_large_names_the_largest_valid_r(vit):
    model = copy.deepcopy(vit)
    n, p = 64 + vit.num_prefix_tokens, vit.num_prefix_tokens
    largest = max(r for r in range(1, n) if all(r <= (n - i * r - p) // 2 for i in range(DEPTH)))
    with pytest.raises(LeanvitError, match=f"ToMe r=12 is too large.*can take here is {largest}"):
        tokens.apply(model, tokens.ToMe(r=12))
    assert tokens.applied(model) is None
    tokens.apply(model, tokens.ToMe(r=largest))


@pytest.mark.parametrize("method,match", [
    # 17 tokens, 6 blocks. r=6, inflect=-1 schedules 12 9 7 4 2 0; r=3 schedules 6 4 3 2 1 0 (the 2 is too many at
    # block 3's 4 tokens) and r=2 schedules 4 3 2 1 0 0, which fits: the user's r, then the block's count, then r=2
    (tokens.ToMe(r=6, inflect=-1), r"^ToMe r=6, inflect=-1 is too large: it schedules r=12 for block 0, which has "
                                   r"17 tokens \(1 protected\) and can merge at most 8\. The largest r every "
                                   r"block can take here with inflect=-1 is 2\."),
    (tokens.ToMe(r=3, inflect=-1), r"^ToMe r=3, inflect=-1 is too large: it schedules r=2 for block 3, which has "
                                   r"4 tokens \(1 protected\) and can merge at most 1\. The largest r every "
                                   r"block can take here with inflect=-1 is 2\."),
    (tokens.ToMe(r=(0, 9, 2)), r"^ToMe r=\(0, 9, 2\) is too large: it schedules r=9 for block 1, which has 17 "
                               r"tokens \(1 protected\) and can merge at most 8\. Lower that block's count\.$"),
    (tokens.ToMe(r=5), r"^ToMe r=5 is too large: block 2 has 7 tokens \(1 protected\) and can merge at most 3\. "
                       r"The largest r every block can take here is 2\."),
])
def test_r_too_large_names_the_users_r_and_the_blocks_count(method, match):
    with pytest.raises(LeanvitError, match=match):
        method.token_counts(17, 1, 6)
    largest = re.search(r"can take here.* is (\d+)", match)
    if largest:  # the hint is an r of the user's own form that fits
        replace(method, r=int(largest[1])).token_counts(17, 1, 6)


def test_any_integer_type_is_taken(vit):
    """A sweep's numpy integers (or a 0-d tensor) are ints; the method equals the one built from Python ints."""
    assert tokens.ToMe(r=np.int64(2)) == tokens.ToMe(r=2) and tokens.ToMe(r=torch.tensor(2)).r == 2
    assert tokens.ToMe(r=np.int32(4), inflect=np.float64(-1)) == tokens.ToMe(r=4, inflect=-1)
    assert tokens.ToMe(r=np.array([0, 2, 1])) == tokens.ToMe(r=(0, 2, 1))
    assert tokens.EViT(layers=np.array([4, 1]), keep_rate=np.float32(0.5)) == tokens.EViT(keep_rate=0.5, layers=(1, 4))
    n = 64 + vit.num_prefix_tokens
    assert tokens.token_counts(reduced(vit, tokens.ToMe(r=np.int64(2)))) == [n - 2 * (i + 1) for i in range(DEPTH)]


@pytest.mark.parametrize("make,match", [
    (lambda: tokens.ToMe(r=8.0), r"^ToMe r must be an int or a sequence of ints \(one per block\), e\.g\. 8 or "
                                 r"\(0, 2, 2, 1\), got 8\.0\.$"),
    (lambda: tokens.ToMe(r="8"), r"ToMe r must be an int or a sequence of ints.*got '8'"),
    (lambda: tokens.ToMe(r=None), r"ToMe r must be an int or a sequence of ints.*got None"),
    (lambda: tokens.ToMe(r=(1.5, 2, 0)), r"ToMe r must be an int or a sequence of ints.*got \(1\.5, 2, 0\)"),
    (lambda: tokens.ToMe(r=8, inflect="-1"), r"ToMe inflect must be in \[-1, 1\].*inflect='-1'"),
    (lambda: tokens.EViT(layers=3), r"^EViT layers must be a sequence of block indices, e\.g\. \(3, 6, 9\), got 3\.$"),
    (lambda: tokens.EViT(layers=(3.0, 6)), r"EViT layers must be a sequence of block indices.*got \(3\.0, 6\)"),
    (lambda: tokens.EViT(keep_rate="0.5"), r"EViT keep_rate must be in \(0, 1\], got '0\.5'"),
])
def test_arguments_of_the_wrong_type_are_named(make, match):
    with pytest.raises(LeanvitError, match=match):
        make()


def test_not_a_plain_vit():
    cnn = timm.create_model("resnet10t", num_classes=10)
    with pytest.raises(LeanvitError, match="plain ViTs"):
        tokens.apply(cnn, tokens.EViT())
    avg = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, global_pool="avg", class_token=False)
    with pytest.raises(LeanvitError, match="class token"):
        tokens.apply(avg, tokens.ToMe(r=1))


def test_method_must_fit_the_model(vit):
    with pytest.raises(LeanvitError, match=r"EViT layers \[9\] do not exist"):
        tokens.apply(copy.deepcopy(vit), tokens.EViT(layers=(3, 9)))
    with pytest.raises(LeanvitError, match="one of each per block"):
        tokens.apply(copy.deepcopy(vit), tokens.DiffRate(prune=(60,) * 3, merge=(60,) * 3))
    with pytest.raises(LeanvitError, match="no published rates"):
        tokens.apply(copy.deepcopy(vit), tokens.DiffRate(target_macs=1e7))
    with pytest.raises(LeanvitError, match="Expected a token method"):
        tokens.apply(copy.deepcopy(vit), "evit:0.7")


def test_grad_checkpointing_is_refused(vit, images):
    model = reduced(vit, tokens.ToMe(r=2))
    model.set_grad_checkpointing(True)
    with pytest.raises(LeanvitError, match="checkpointing"):
        model(images)


def test_a_masked_forward_warns_that_it_runs_unreduced(vit, images):
    """timm runs a forward with attn_mask / is_causal block by block, over the original blocks."""
    model = reduced(vit, tokens.ToMe(r=2))
    n = model_tokens(model)
    with pytest.warns(UserWarning, match=r"ran without its token reduction \(ToMe"):
        masked = model(images, attn_mask=torch.zeros(n, n))
    with pytest.warns(UserWarning, match="without its token reduction"):
        model(images, None, True)
    torch.testing.assert_close(masked, tokens.remove(copy.deepcopy(model))(images))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(images)  # the reduced path: no warning
        tokens.remove(model)(images, attn_mask=torch.zeros(n, n))  # nothing to skip once removed


def test_a_pruned_model_is_unreduced_and_may_checkpoint(vit, images):
    """timm's prune_intermediate_layers keeps the original blocks: the refusal above must not outlive the reduction."""
    model = reduced(vit, tokens.ToMe(r=2))
    model.prune_intermediate_layers(indices=2, prune_head=False)
    assert tokens.applied(model) is None
    model.set_grad_checkpointing(True)
    assert model(images).shape == (3, 10)


# ---------------------------------------------------------------------------------------------
# What the first mutation review of this file found unchecked


def _timm_block_parts_vit():
    """A ViT whose blocks use every part timm's Block and Attention may have: QK norm, the attention output's norm,
    a sigmoid gate, layer scales, attention / projection dropout and drop path, all with random weights."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                              num_classes=10, qk_norm=True, scale_attn_norm=True, init_values=0.5,
                              attn_drop_rate=0.3, proj_drop_rate=0.2, drop_path_rate=0.3)
    for blk in model.blocks:
        blk.attn.gate = torch.nn.Linear(48, 48)
    return randomised(model)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("sized", [False, True])
def test_the_reducing_block_is_timms_block(training, sized):
    """Between reductions a block must compute what timm's Block does: QK norms, the attention output's norm, the
    gate, both layer scales, and dropout / drop path in training only (same random draws, in the same order). Without
    token sizes the attention stays on SDPA, as timm's fused path; with sizes (all 1: log 0, no bias) it is written
    out, as timm's unfused path. Dropping any of them changes a fine-tuned or QK-normed ViT silently."""
    from leanvit.compress.tokens.patch import block_forward

    model = _timm_block_parts_vit().train(training)
    x = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(6))
    method = tokens.ToMe(r=1) if sized else tokens.EViT()  # proportional (takes sizes), or not
    size = torch.ones(2, 17, 1) if sized else None
    for blk in model.blocks:
        blk.attn.fused_attn = not sized
        torch.manual_seed(7)
        want = blk(x)
        torch.manual_seed(7)
        got, got_size = block_forward(blk, x, size, None, method)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got_size is size
        x = want


def test_a_per_block_r_as_long_as_the_model_is_taken_and_a_longer_one_refused():
    assert tokens.ToMe(r=(1,) * DEPTH).schedule(DEPTH) == [1] * DEPTH
    with pytest.raises(LeanvitError, match=f"ToMe got {DEPTH + 1} per-block r values for a {DEPTH}-block model"):
        tokens.ToMe(r=(1,) * (DEPTH + 1)).schedule(DEPTH)


def test_tome_refuses_an_input_whose_tokens_cannot_merge_r():
    """A model taking other input sizes (dynamic_img_size) gets fewer tokens than apply() validated: merging r of them
    would take masked pairs, the class token among them, instead of refusing."""
    torch.manual_seed(0)
    model = tokens.apply(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=2,
                                           num_heads=3, num_classes=10, dynamic_img_size=True).eval(), tokens.ToMe(r=16))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(LeanvitError, match=r"^ToMe r=16 is too large for this input: block 0 gets 17 tokens "
                                           r"\(1 protected\) and can merge at most 8\."):
        model(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("num_tokens,match", [
    # 9 tokens: r=2 leaves 7, 5, 3 and block 3 can merge 1; r=1 fits all four blocks
    (9, r"block 3 has 3 tokens \(1 protected\) and can merge at most 1\. The largest r every block can take here is "
        r"1\."),
    (4, r"block 0 has 4 tokens \(1 protected\) and can merge at most 1\. No r > 0 fits every block here\."),
])
def test_r_too_large_names_a_largest_r_of_one_or_none(num_tokens, match):
    with pytest.raises(LeanvitError, match=match):
        tokens.ToMe(r=2).token_counts(num_tokens, 1, 4)


def test_a_negative_r_is_refused():
    with pytest.raises(LeanvitError, match=r"ToMe r must be >= 0, got -1\."):
        tokens.ToMe(r=-1)
    with pytest.raises(LeanvitError, match=r"ToMe r must be >= 0"):
        tokens.ToMe(r=(2, -1, 0))


@torch.no_grad()
@pytest.mark.parametrize("method", [
    tokens.ToMe(r=4),
    tokens.EViT(keep_rate=0.5, fuse=False, layers=(1, 4)),
    tokens.EViT(keep_rate=0.99, fuse=True, layers=(0, 2)),  # ceil(0.99 * 64) = 64: nothing to drop
    tokens.EViT(keep_rate=0.7, fuse=True, layers=tuple(range(DEPTH))),  # down to a block where nothing drops
    tokens.DiffRate(prune=(200, 60, 60, 40, 40, 12), merge=(200, 62, 50, 50, 30, 200)),
])
def test_token_counts_are_the_shapes_the_forward_produces(vit, images, method):
    """Exports and MAC counts trust the static counts; a count one off (a fused token counted where none was added, or
    a DiffRate count above the tokens there are) would describe another model."""
    model = reduced(vit, method)
    seen = []
    hooks = [blk.mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for blk in model.blocks]
    model(images)
    for h in hooks:
        h.remove()
    assert seen == tokens.token_counts(model)


def test_evit_and_diffrate_token_counts(vit):
    p, n = vit.num_prefix_tokens, 64 + vit.num_prefix_tokens
    counts = tokens.EViT(keep_rate=0.5, fuse=False, layers=(1, 4)).token_counts(n, p, DEPTH)
    assert counts == [n, p + 32, p + 32, p + 32, p + 16, p + 16]  # no fused token
    assert tokens.EViT(keep_rate=0.99, layers=(0, 2)).token_counts(n, p, DEPTH) == [n] * DEPTH
    # 3 patch tokens at keep 0.7: ceil(2.1) = 3 kept, so nothing is dropped and no fused token is added
    assert tokens.EViT(keep_rate=0.7, layers=(0, 1)).token_counts(1 + 3, 1, 2) == [4, 4]
    assert tokens.DiffRate(prune=(200, 60, 60, 40), merge=(200, 62, 50, 50)).token_counts(n, p, 4) == [n, 60, 50, 40]
    assert tokens.token_counts(reduced(vit, tokens.ToMe(r=4)), 33) == [29, 25, 21, 17, 13, 9]  # another input size


@torch.no_grad()
def test_evit_at_a_block_with_nothing_to_drop_is_the_original_block(vit, images):
    """Official EViT skips a block whose keep rate keeps every token: a fused token of weight 0 appended there would
    be one more token in every later attention."""
    torch.testing.assert_close(reduced(vit, tokens.EViT(keep_rate=0.99, layers=(0, 2)))(images), vit(images),
                               atol=1e-5, rtol=1e-5)


def test_keep_rate_within_an_epoch_follows_evits_cosine():
    """EViT's ``adjust_keep_rate`` (warm-up 1 epoch, shrink to epoch 3, 10 steps per epoch): the cosine moves every
    step, not only at epoch boundaries, and stays at the target once the shrink is over."""
    at = [tokens.keep_rate_at(s, 10, 0.5, start_epoch=1, shrink_epochs=2) for s in (9, 10, 15, 29, 30, 35)]
    assert at == pytest.approx([1.0, 1.0, 0.5 + 0.25 * (math.cos(math.pi / 4) + 1), 0.5030779148512156, 0.5, 0.5])


def test_keep_rate_warmup_needs_a_step_per_epoch(vit):
    with pytest.raises(LeanvitError, match="steps_per_epoch must be at least 1, got 0"):
        tokens.keep_rate_warmup(reduced(vit, tokens.EViT(keep_rate=0.5, layers=(1,))), steps_per_epoch=0)


def test_evit_layers_must_be_blocks_of_the_model(vit):
    """A negative index matched no block: the model ran unreduced at that layer, silently."""
    with pytest.raises(LeanvitError, match=r"EViT layers \[-1\] do not exist in a 6-block model; pass layers within "
                                           r"0\.\.5\."):
        tokens.apply(copy.deepcopy(vit), tokens.EViT(layers=(-1, 3)))


def test_a_class_token_vit_pooling_otherwise_is_refused():
    """Its head averages the tokens: merging or dropping them changes what it pools, unlike a class-token read."""
    avg = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, global_pool="avg", class_token=True)
    with pytest.raises(LeanvitError, match="pools with 'avg' rather than reading a class token"):
        tokens.apply(avg, tokens.ToMe(r=1))


# ---------------------------------------------------------------------------------------------
# What the second mutation review found unchecked


@torch.no_grad()
def test_tome_merging_half_the_tokens_or_one_matches_reference(vit, images):
    """r at its bound merges every mergeable A token (64 patch tokens, r=32) and r=1 merges one: both are merges like
    any other, not a refusal at run time or a skipped block."""
    out = reduced(vit, tokens.ToMe(r=(32, 1, 0)))(images)
    ref = torch.stack([tome_reference(vit, img, [32, 1, 0, 0, 0, 0]) for img in images])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_tome_at_run_time_merges_at_most_half_of_an_odd_token_count():
    """3x3 patches (a 12x12 input to a dynamic-size model) and the class token: 9 unprotected tokens, of which A holds
    4 mergeable ones. r=4 runs; r=5 would have to merge the class token and is refused."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10, dynamic_img_size=True)
    vit, small = timm.create_model("deit_tiny_patch16_224", **kw).eval(), torch.randn(1, 3, 12, 12)
    assert tokens.apply(vit, tokens.ToMe(r=(4,)))(small).shape == (1, 10)
    with pytest.raises(LeanvitError, match=r"r=\(5,\) is too large for this input: it schedules r=5 for block 0, "
                                           r"which gets 10 tokens \(1 protected\) and can merge at most 4\."):
        tokens.apply(vit, tokens.ToMe(r=(5,)))(small)


def test_evit_layer_one_past_the_last_block_is_refused(vit):
    """Index ``depth`` names no block: taken, the model would run unreduced there, silently."""
    with pytest.raises(LeanvitError, match=r"EViT layers \[6\] do not exist in a 6-block model"):
        tokens.apply(copy.deepcopy(vit), tokens.EViT(layers=(2, DEPTH)))
    with pytest.raises(LeanvitError, match=r"EViT layers \[6\] do not exist"):  # the static counts too
        tokens.EViT(layers=(DEPTH,)).token_counts(65, 1, DEPTH)


def test_keep_rate_schedule_defaults_are_the_official_recipe(vit):
    """EViT's run_code.sh (300 epochs): keep rate 1 for 10 epochs, then a cosine down over 100 epochs. Here with one
    step per epoch, which the warm-up must take."""
    def cosine(epoch):  # adjust_keep_rate's formula, by hand
        return 0.5 + 0.5 * (math.cos(math.pi * (epoch - 10) / 100) + 1) / 2

    assert [tokens.keep_rate_at(e, 1, 0.5) for e in (9, 10, 60, 110)] == pytest.approx([1.0, 1.0, 0.75, 0.5])
    hook = tokens.keep_rate_warmup(reduced(vit, tokens.EViT(keep_rate=0.5, layers=(1,))), steps_per_epoch=1)
    assert [hook(e) for e in (9, 33, 109, 110)] == pytest.approx([1.0, cosine(33), cosine(109), 0.5])


def test_keep_rate_warmup_needs_evit_applied(vit):
    """On an unreduced model or one with ToMe applied there is no keep rate to drive: refused up front, not an
    AttributeError at the first training step."""
    for model in (copy.deepcopy(vit), reduced(vit, tokens.ToMe(r=2))):
        with pytest.raises(LeanvitError, match="keep-rate warm-up needs a model with EViT applied"):
            tokens.keep_rate_warmup(model, steps_per_epoch=10)


def test_numpy_rates_are_plain_floats_in_the_repr():
    """A sweep's numpy keep rate or inflection prints as a plain number (CLI tables, checkpoint metadata)."""
    assert repr(tokens.EViT(keep_rate=np.float64(0.5))) == repr(tokens.EViT(keep_rate=0.5))
    assert type(tokens.EViT(keep_rate=np.float32(0.5)).keep_rate) is float
    assert repr(tokens.ToMe(r=4, inflect=np.float64(-0.5))) == repr(tokens.ToMe(r=4, inflect=-0.5))


def test_inflect_with_per_block_counts_is_refused():
    """Per-block counts are the schedule already: an inflection given with them would be ignored, silently."""
    with pytest.raises(LeanvitError, match=r"inflect must be in \[-1, 1\] and given with an int r, got r=\(2, 1, 0\)"):
        tokens.ToMe(r=(2, 1, 0), inflect=0.5)


def test_tome_inflection_truncates_as_official_parse_r():
    """tome.utils.parse_r: lo = int(r * (1 - inflect)), hi = 2r - lo, int(lo + step * i) in between. r=5, inflect=0.3
    over 4 blocks: lo = int(3.5) = 3, hi = 7, step 4/3: 3, int(4.33), int(5.67), 7."""
    assert tokens.ToMe(r=5, inflect=0.3).schedule(4) == [3, 4, 5, 7]


def test_a_positional_attention_mask_warns_too(vit):
    """timm's forward(x, attn_mask, is_causal): a mask passed by position also runs the original blocks."""
    model = reduced(vit, tokens.ToMe(r=2))
    n = model_tokens(model)
    with pytest.warns(UserWarning, match="ran without its token reduction"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(n, n))


def test_token_counts_of_an_unreduced_model_is_refused(vit):
    with pytest.raises(LeanvitError, match="No token reduction is applied to this model"):
        tokens.token_counts(vit)


def test_from_spec_passes_options_and_ignores_surrounding_space():
    assert tokens.from_spec("tome:8", prop_attn=False) == tokens.ToMe(r=8, prop_attn=False)
    assert tokens.from_spec("diffrate:2.9", steps=7) == tokens.DiffRate(target_macs=2.9e9, steps=7)
    assert tokens.from_spec(" tome :8") == tokens.ToMe(r=8) and tokens.from_spec(" evit: 0.5 ") == tokens.EViT(0.5)


def test_non_standard_blocks_are_refused():
    """A post-norm block or another attention (differential attention has a qkv too) would run through timm Block's
    pre-norm forward and plain attention: another model, silently."""
    from timm.layers import DiffAttention
    from timm.models.vision_transformer import ResPostBlock

    for kw, named in ((dict(block_fn=ResPostBlock), "ResPostBlock"), (dict(attn_layer=DiffAttention),
                                                                      "Block with DiffAttention")):
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48,
                                  num_heads=3, **kw)
        with pytest.raises(LeanvitError, match=rf"non-standard transformer blocks \({named}\)"):
            tokens.apply(model, tokens.ToMe(r=1))
