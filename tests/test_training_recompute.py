"""training_recompute.py: checkpointed layers chosen per batch, and the loss in chunks, on real Qwen2 models (tiny
configs built here): exact against the model's own forward and loss, and saving the memory the estimate says."""

import pytest

torch = pytest.importorskip("torch")

from selflengthen.pipeline.train_memory import (  # noqa: E402
    Decision,
    Fit,
    GiB,
    ModelShape,
    decide,
    estimate,
    layer_bytes_per_token,
    layer_input_bytes,
    recompute_share,
)
from selflengthen.pipeline.training_recompute import (  # noqa: E402
    Recompute,
    chunked_loss,
    decoder_layers,
    use_chunked_loss,
)

DIMS = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)


def qwen2(layers=4, vocab=512, lora=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=256,
                                         attn_implementation="sdpa", use_cache=False, **DIMS))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM",
                                                 lora_dropout=0.0))
    model.train()
    return model


def batch(tokens=40, vocab=512, seed=1, masked=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, tokens), generator=g)
    labels = ids.clone()
    labels[:, :masked] = -100  # a prompt: no loss on it
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 1000])  # chunks that do not divide the length, and one chunk
def test_the_chunked_loss_is_the_models_own_loss_and_gradients(lora, chunk):
    ids, labels = batch()
    own = loss_and_grads(qwen2(lora=lora), ids, labels)
    model = qwen2(lora=lora)
    assert use_chunked_loss(model, chunk)
    chunked = loss_and_grads(model, ids, labels)
    torch.testing.assert_close(chunked[0], own[0], rtol=1e-5, atol=1e-6)
    assert chunked[1].keys() == own[1].keys() and own[1]
    for name, grad in own[1].items():
        torch.testing.assert_close(chunked[1][name], grad, rtol=1e-4, atol=1e-6)
    # the Trainer's normalisation by the batch's item count (gradient accumulation) is the model's too
    items = torch.tensor(50)
    torch.testing.assert_close(loss_and_grads(model, ids, labels, num_items_in_batch=items)[0],
                               loss_and_grads(qwen2(lora=lora), ids, labels, num_items_in_batch=items)[0],
                               rtol=1e-5, atol=1e-6)


def test_the_chunked_loss_keeps_no_logits_and_eval_is_untouched():
    ids, labels = batch()
    model = qwen2()
    use_chunked_loss(model, 8)
    assert model(input_ids=ids, labels=labels).logits is None  # training: the chunks hold them one at a time
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 40, 512) and out.loss is not None
    assert not use_chunked_loss(qwen2(), 0)


def test_chunked_loss_function_matches_cross_entropy_directly():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 10, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (1, 10), generator=g)
    labels[0, :3] = -100
    want = torch.nn.functional.cross_entropy(head(hidden)[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(chunked_loss(head, hidden, labels, 3), want)


# -- memory: what autograd keeps, against the estimate --------------------------------------------------------------


def saved_bytes(model, ids, labels) -> int:
    """Bytes autograd keeps for the backward of one forward with a loss, the parameters apart."""
    from saved_tensors import saved_bytes as measured

    return measured(model, lambda: model(input_ids=ids, labels=labels))


def test_a_chunked_loss_keeps_no_vocabulary_sized_tensor():
    """A 16x larger vocabulary adds ~4 bytes per token per vocabulary entry to the model's own loss (the saved
    log-softmax, train_memory.LOSS_SAVED) and nothing to the chunked one."""
    ids, labels = batch(tokens=64, vocab=256)
    own = {v: saved_bytes(qwen2(vocab=v), ids, labels) for v in (256, 4096)}
    chunked = {}
    for v in (256, 4096):
        model = qwen2(vocab=v)
        use_chunked_loss(model, 16)
        chunked[v] = saved_bytes(model, ids, labels)
    tokens = ids.numel()
    assert (own[4096] - own[256]) / (tokens * (4096 - 256)) == pytest.approx(4, rel=0.05)
    # the embeddings' output differs by nothing that grows with the vocabulary
    assert abs(chunked[4096] - chunked[256]) < 0.01 * (own[4096] - own[256])


def _saved_per_token(decision=None):
    """Saved bytes per token of one forward of a 4-layer model (loss chunked: no logits in the way), checkpointing
    as `decision` says (None: no hook), and the hook."""
    ids, labels = batch(tokens=64)
    model = qwen2()
    use_chunked_loss(model, 16)
    hook = Recompute(model, decision) if decision is not None else None
    return saved_bytes(model, ids, labels) / ids.numel(), hook


SHAPE4 = ModelShape(params=0, trainable=0, layers=4, hidden=64, intermediate=192, kv=32, vocab=512)
SAVED_BY_ONE = layer_bytes_per_token(SHAPE4, "full", "fp32") - layer_input_bytes("full", "fp32") * 64


def test_true_checkpoints_every_layer():
    base, _ = _saved_per_token()
    every, hook = _saved_per_token(Decision(True, "true", layers=4, of_layers=4))
    assert hook.per_layer and len(decoder_layers(hook.layers[0])) == 1 and len(hook.layers) == 4
    assert [layer.gradient_checkpointing for layer in hook.layers] == [True] * 4
    # each checkpointed layer keeps its input in place of its activations (the recompute peak comes later)
    assert base - every == pytest.approx(4 * SAVED_BY_ONE, rel=0.1)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_k_checkpointed_layers_save_what_the_estimate_says(k):
    """k of 4 layers checkpointed (fp32 full fine-tuning, as the coefficients' own test measures it) save k
    layers' activations less their inputs: train_memory.saved_activation_bytes' terms."""
    base, _ = _saved_per_token()
    partial, hook = _saved_per_token(Decision(True, "test", layers=k, of_layers=4, fit=_fixed_fit(k)))
    assert [layer.gradient_checkpointing for layer in hook.layers] == [i < k for i in range(4)]
    assert base - partial == pytest.approx(k * SAVED_BY_ONE, rel=0.1, abs=8)
    assert hook.summary() == {"byLayers": {str(k): 1}, "chunkedLoss": 0}


def _fixed_fit(k: int):
    """A Fit whose plan is k layers and the model's own loss for any batch (the per-batch choice is tested on its
    own below)."""

    class Fixed(Fit):
        def plan(self, tokens: int) -> tuple[int, int]:
            return k, 0

    shape = ModelShape(params=1, trainable=1, layers=4, hidden=1, intermediate=1, kv=1, vocab=1)
    return Fixed(shape, "full", "fp32", 0.0)


def test_each_batch_recomputes_as_little_as_it_needs():
    """Under auto a short batch recomputes nothing, a long one the cheapest way that fits (here: the loss in
    chunks, cheaper than layers for this large-vocabulary shape), a longer one layers too; the forwards are counted
    by plan, and the loss and gradients do not depend on it."""
    shape = ModelShape(params=10**6, trainable=10**6, layers=4, hidden=64, intermediate=192, kv=32, vocab=512)
    fit = Fit(shape, "full", "fp32", estimate(shape, 80, "full", "fp32", 0).total, loss_chunk=16)  # 80 fit
    assert fit.plan(80) == (0, 0)
    assert fit.plan(96) == (0, 16)  # the 96 x 512 logits go: the layers' activations then fit
    k, chunk = fit.plan(160)
    assert chunk == 16 and 0 < k < 4 and fit.total(160, k) <= fit.room < fit.total(160, k - 1)
    assert fit.plan(10**6) == (4, 16)  # nothing fits: everything (the estimate already warned)
    decision = Decision(True, "test", layers=k, of_layers=4, loss_chunk=16, fit=fit)
    model, plain = qwen2(), qwen2()
    hook = Recompute(model, decision)
    assert hook.chunked
    for ids, labels in (batch(tokens=40), batch(tokens=48), batch(tokens=80)):  # batches of 2: 80, 96, 160
        got, want = loss_and_grads(model, ids, labels), loss_and_grads(plain, ids, labels)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for name, grad in want[1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-6)
    assert hook.summary() == {"byLayers": {"0": 2, str(k): 1}, "chunkedLoss": 2}
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch(tokens=80)[0])
    assert out.logits is not None and hook.summary()["chunkedLoss"] == 2  # evaluation: untouched, not counted


def test_false_and_the_cpu_leave_the_model_alone():
    for d in (decide("false", None, 10, "lora", "fp32", None), decide("auto", None, 10, "lora", "fp32", None)):
        model = qwen2()
        hook = Recompute(model, d)
        assert hook.handle is None and not model.is_gradient_checkpointing


# -- the decision on the paper's model ------------------------------------------------------------------------------

L7, H7, I7, KV7, V7 = 28, 3584, 18944, 512, 152064
LORA_7B = L7 * 8 * (2 * (H7 + H7) + 2 * (H7 + KV7) + 3 * (H7 + I7))
Q7_LORA = ModelShape(params=7_615_616_512 + LORA_7B, trainable=LORA_7B, layers=L7, hidden=H7, intermediate=I7,
                     kv=KV7, vocab=V7, lora_rank=8)


def test_the_paper_step_on_an_h100_checkpoints_part_of_the_layers_and_short_batches_none():
    """Qwen2-7B LoRA at the paper's 16k cutoff on 80 GiB: all layers with the model's own loss (its 32 GiB of
    logits), about half of them with the loss in 1024-position chunks; a 4k batch none."""
    own = decide("auto", Q7_LORA, 16384, "lora", "bf16", 80 * GiB)
    chunked = decide("auto", Q7_LORA, 16384, "lora", "bf16", 80 * GiB, loss_chunk=1024)
    assert own.layers >= L7 - 4, own  # nearly all
    assert 10 <= chunked.layers <= 20, chunked
    assert chunked.plan_for(4096) == (0, 0) and chunked.plan_for(16384) == (chunked.layers, 1024)
    assert chunked.summary()["layers"] == chunked.layers and "fit" not in chunked.summary()
    assert f"{chunked.layers} of 28 layers checkpointed and the loss in chunks of 1024" in chunked.reason
    # FLOPs: all layers recomputed is the usual 6N / 4N; half of them and a chunked loss in between
    # (the layers are 86 % of the parameters: the output projection is not recomputed by layer checkpointing)
    assert 1.4 < recompute_share(Q7_LORA, L7) < 1.5
    assert 1.1 < recompute_share(Q7_LORA, chunked.layers, True) < recompute_share(Q7_LORA, own.layers)
