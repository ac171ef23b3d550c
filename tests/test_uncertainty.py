"""fastprobe.methods.uncertainty on small built-in models: per-token figures equal the float64
reference on each text alone whatever the batching and padding, vocabularies padded differently
are aligned, generation is scored up to its eos, and sequence scores and AUROC are right."""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastprobe as fp
from fastprobe.methods import uncertainty
from fastprobe.models import DEMO_TEXTS, tiny_model, tiny_tokenizer

from .dropout_helpers import check_eval_mode, with_dropout

pytest.importorskip("transformers")
pandas = pytest.importorskip("pandas")

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = DEMO_TEXTS[:5] + ["Short.", ""]  # the empty text is BOS alone: no token to score
STATISTICS = ("epistemic", "jsd", "kl_mixture_target", "target_entropy", "mixture_entropy")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def sharp_model(tokenizer, arch="llama", seed=0, extra_vocab=0):
    """A tiny model whose output layer is scaled up, so its next-token distributions are far
    from uniform and the drafts really disagree."""
    model = tiny_model(arch, vocab_size=len(tokenizer) + extra_vocab, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def models(tokenizer):
    target = sharp_model(tokenizer, seed=0)
    drafts = [sharp_model(tokenizer, seed=1), sharp_model(tokenizer, "gpt2", seed=2, extra_vocab=13)]
    return target, drafts


def expected_rows(target, drafts, tokenizer, text, weights=None, temperature=1.0):
    """The float64 reference of every scored position of one text (or [1, L] token ids), run
    alone (no padding)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"] if isinstance(text, str) else text
    with torch.no_grad():
        logits = [model(input_ids=ids).logits[0, :-1].double() for model in [target] + drafts]
    vocab = len(tokenizer)
    result = fp.reference.draft_divergence(torch.stack([l[:, :vocab] for l in logits[1:]]), logits[0][:, :vocab],
                                           weights=weights, temperature=temperature)
    return ids[0, 1:], result


def check_against_reference(table, target, drafts, tokenizer, texts, **options):
    assert list(table.columns) == ["text", "position", "token_id", "token"] + list(STATISTICS)
    for index, text in enumerate(texts):
        rows = table[table["text"] == index]
        token_ids, result = expected_rows(target, drafts, tokenizer, text, **options)
        assert rows["token_id"].tolist() == token_ids.tolist()
        assert rows["position"].tolist() == list(range(1, len(token_ids) + 1))
        assert rows["token"].tolist() == [tokenizer.decode([i]) for i in token_ids.tolist()]
        for name in STATISTICS:
            torch.testing.assert_close(torch.tensor(rows[name].to_numpy()), result[name], atol=2e-4, rtol=1e-4,
                                       msg=lambda m: f"{name} of text {index}: {m}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_uncertainty_equals_the_reference_text_by_text(tokenizer, models, side):
    target, drafts = models
    tokenizer.padding_side = side
    try:
        table = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS, batch_size=3, progress=False)
    finally:
        tokenizer.padding_side = "right"
    check_against_reference(table, target, drafts, tokenizer, TEXTS)
    assert table["epistemic"].max() > 0.5  # sharp, disagreeing models: the test is not comparing near-zeros
    assert table["text"].is_monotonic_increasing and 6 not in set(table["text"])


def test_the_token_tables_dtypes_do_not_depend_on_the_batching(tokenizer, models):
    """A batch with no token to score (the empty text alone, batch_size=1) made an empty table whose
    token_id column pandas typed float64, and concatenated with the others it turned every token_id
    into a float."""
    target, drafts = models
    tables = [uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS, batch_size=size, progress=False)
              for size in (1, len(TEXTS))]
    empty = uncertainty.token_uncertainty(target, drafts, tokenizer, [""], progress=False)
    for table in tables + [empty]:
        assert table.dtypes.to_dict() == tables[-1].dtypes.to_dict()
        assert table["token_id"].dtype == "int64" and table["token"].dtype == object
    pandas.testing.assert_frame_equal(tables[0], tables[1], rtol=1e-5)


@pytest.mark.parametrize("template", ["<s> $A", "<s> </s> $A"])
def test_position_is_the_index_in_the_text_also_after_left_truncation(tokenizer, models, template, fresh_seed):
    """A tokenizer that truncates on the left (truncation_side="left") keeps a long text's end,
    after its leading special tokens: each row's position is still its token's index in the
    text's own tokens (it counted from the window's start: 1 where the text had 28), the special
    tokens keep theirs, and the figures are those of the window alone."""
    from tokenizers import processors

    target, drafts = models
    left = copy.deepcopy(tokenizer)
    left.truncation_side = "left"
    left.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    before = template.split().index("$A")  # special tokens before the text
    max_length = int(torch.randint(8, 20, ()))
    texts = TEXTS[:6]
    table = uncertainty.token_uncertainty(target, drafts, left, texts, max_length=max_length, batch_size=4,
                                          progress=False)
    assert table["text"].nunique() == len(texts)
    cut = 0
    for index, text in enumerate(texts):
        rows, full = table[table["text"] == index], left(text)["input_ids"]
        window = left(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        cut += len(full) > window.shape[1]
        assert [full[position] for position in rows["position"]] == rows["token_id"].tolist()
        # the special tokens after the first, then the window's text tokens: the text's last ones
        assert rows["position"].tolist() == [*range(1, before), *range(len(full) - window.shape[1] + before, len(full))]
        _, result = expected_rows(target, drafts, left, window)
        torch.testing.assert_close(torch.tensor(rows["epistemic"].to_numpy()), result["epistemic"], atol=2e-4,
                                   rtol=1e-4)
    assert 0 < cut < len(texts)  # long texts cut, "Short." whole


def test_each_model_gets_position_ids_in_its_own_numbering(tokenizer, models):
    """A RoBERTa-family draft (learned positions from padding_idx + 1) beside a Llama target: each
    model reads the batch with its own position_ids, for texts and for a generation's scoring."""
    transformers = pytest.importorskip("transformers")
    target, drafts = models
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        roberta = transformers.RobertaForCausalLM(transformers.RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, pad_token_id=tokenizer.pad_token_id, is_decoder=True,
            max_position_embeddings=64)).eval()
    with torch.no_grad():
        roberta.get_output_embeddings().weight.mul_(30.0)
    tokenizer.padding_side = "left"
    try:
        table = uncertainty.token_uncertainty(target, [drafts[0], roberta], tokenizer, TEXTS, batch_size=3,
                                              progress=False)
    finally:
        tokenizer.padding_side = "right"
    check_against_reference(table, target, [drafts[0], roberta], tokenizer, TEXTS)
    generated, tokens = uncertainty.generate_with_uncertainty(target, [roberta], tokenizer, TEXTS[:3],
                                                              max_new_tokens=4, progress=False)
    for index, prompt in enumerate(TEXTS[:3]):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        rows = tokens[tokens["text"] == index]
        whole = torch.cat([ids, torch.tensor([rows["token_id"].tolist()])], dim=1)
        _, result = expected_rows(target, [roberta], tokenizer, whole)
        torch.testing.assert_close(torch.tensor(rows["epistemic"].to_numpy()), result["epistemic"][-len(rows):],
                                   atol=2e-4, rtol=1e-4)


def test_models_offloaded_by_accelerate_are_fed_where_they_compute(tokenizer, models):
    """A target and a draft whose weights accelerate offloads (meta placeholders, loaded by its
    hooks at each forward on the CPU): the same table as the models in memory, from text and from
    generation. Their inputs were sent to the meta device ("Cannot copy out of meta tensor")."""
    import accelerate

    target, drafts = models
    expected = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS[:3], progress=False)
    _, expected_generated = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, TEXTS[:2],
                                                                  max_new_tokens=3, progress=False)
    offloaded = [accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu") for model in [target, drafts[0]]]
    assert next(offloaded[0].parameters()).is_meta
    table = uncertainty.token_uncertainty(offloaded[0], [offloaded[1], drafts[1]], tokenizer, TEXTS[:3],
                                          progress=False)
    pandas.testing.assert_frame_equal(table, expected, rtol=1e-5, atol=1e-5)
    _, generated = uncertainty.generate_with_uncertainty(offloaded[0], [offloaded[1], drafts[1]], tokenizer,
                                                         TEXTS[:2], max_new_tokens=3, progress=False)
    pandas.testing.assert_frame_equal(generated, expected_generated, rtol=1e-5, atol=1e-5)


def test_drafts_in_a_module_list(tokenizer, models):
    """A ModuleList of drafts is the list of them (it was taken as one draft model, and failed
    with "_forward_unimplemented() got an unexpected keyword argument 'input_ids'")."""
    target, drafts = models
    table = uncertainty.token_uncertainty(target, torch.nn.ModuleList(drafts), tokenizer, TEXTS[:2], progress=False)
    expected = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS[:2], progress=False)
    pandas.testing.assert_frame_equal(table, expected)


def test_weights_and_temperature(tokenizer, models):
    target, drafts = models
    weights = torch.tensor([0.25, 0.75])
    table = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS[:3], weights=weights, temperature=2.5,
                                          batch_size=2, progress=False)
    check_against_reference(table, target, drafts, tokenizer, TEXTS[:3], weights=weights.double(), temperature=2.5)


def test_identical_drafts_give_zero_uncertainty(tokenizer, models):
    target, _ = models
    table = uncertainty.token_uncertainty(target, [target, target], tokenizer, TEXTS[:2], progress=False)
    for name in ("epistemic", "jsd", "kl_mixture_target"):
        assert table[name].abs().max() < 1e-4, name
    assert (table["target_entropy"] > 0.01).all()


def test_drafts_of_other_dtypes_and_padded_vocabularies(tokenizer, models):
    """A bfloat16 draft after a float32 one (the stack widens) and drafts whose vocabularies are
    padded differently (the stack narrows): the figures of their logits upcast and cut to the
    shared vocabulary."""
    target, drafts = models
    mixed = [drafts[1], sharp_model(tokenizer, seed=4).to(torch.bfloat16), sharp_model(tokenizer, seed=5, extra_vocab=5)]
    # one text a batch, as the reference runs it: in bfloat16 a padded batch need not give a text's
    # logits alone to the bit (torch 2.8 runs transformers' enable_gqa attention of a text without
    # padding through another kernel than the masked one of a padded batch: logits 0.125 apart);
    # a padded batch is checked below, against the drafts run on that batch
    table = uncertainty.token_uncertainty(target, mixed, tokenizer, TEXTS[:3], batch_size=1, progress=False)
    check_against_reference(table, target, mixed, tokenizer, TEXTS[:3])
    batch = dict(tokenizer(TEXTS[:2], padding=True, return_tensors="pt"))
    scored = batch["attention_mask"].bool()
    target_rows = torch.zeros(int(scored.sum()), len(tokenizer) + 20, dtype=torch.bfloat16)
    order = [mixed[1], mixed[0], mixed[2]]  # bfloat16 first: the stack starts narrow, then widens
    stacked = uncertainty._stacked_drafts(order, batch, scored, target_rows, tokenizer)
    assert stacked.dtype == torch.float32 and stacked.shape == (3, target_rows.shape[0], len(tokenizer))
    for k, draft in enumerate(order):
        with torch.no_grad():
            expected = draft(**batch).logits[scored][:, :len(tokenizer)].float()
        assert torch.equal(stacked[k], expected), k


def test_the_stack_never_narrows_to_a_later_drafts_dtype(tokenizer, models):
    """A bfloat16 target, a float32 draft, then a bfloat16 one: the stack is float32 and the
    float32 draft's logits are kept exactly (the stack took the last draft's dtype with the
    target's, so the same drafts in this order were rounded to bfloat16, in the other not)."""
    _, drafts = models
    batch = dict(tokenizer(TEXTS[:2], padding=True, return_tensors="pt"))
    scored = batch["attention_mask"].bool()
    target_rows = torch.zeros(int(scored.sum()), len(tokenizer), dtype=torch.bfloat16)
    order = [drafts[0], sharp_model(tokenizer, seed=4).to(torch.bfloat16)]
    stacked = uncertainty._stacked_drafts(order, batch, scored, target_rows, tokenizer)
    assert stacked.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(stacked[0], drafts[0](**batch).logits[scored])
        assert torch.equal(stacked[1], order[1](**batch).logits[scored].float())


def _spy_on_draft_divergence(monkeypatch) -> list:
    """The (draft_logits, target_logits) of every draft_divergence call the method makes."""
    calls = []

    def spy(draft_logits, target_logits, **options):
        calls.append((draft_logits, target_logits))
        return fp.draft_divergence(draft_logits, target_logits, **options)

    monkeypatch.setattr(uncertainty, "draft_divergence", spy)
    return calls


def test_a_bfloat16_target_with_float32_drafts_is_not_copied(tokenizer, models, monkeypatch):
    """A bfloat16 target's logits reach draft_divergence as they are (a view of its rows, not a
    float32 copy of the [N, V] logits: the op reads each input in its own dtype), and the figures
    are the same bits as with the target's logits cast to float32 first (what the method did)."""
    target, drafts = models
    batch = dict(tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    scored = uncertainty.scored_positions(batch["attention_mask"])
    with torch.no_grad():
        target_rows = target.to(torch.bfloat16)(**batch).logits[scored]  # [N, V] bfloat16
    target.float()
    calls = _spy_on_draft_divergence(monkeypatch)
    mixed = uncertainty._scored_statistics(target_rows, drafts, batch, scored, None, 1.3, tokenizer)
    draft_logits, target_logits = calls[0]
    assert draft_logits.dtype == torch.float32 and target_logits.dtype == torch.bfloat16
    assert target_logits.data_ptr() == target_rows.data_ptr()
    cast_first = uncertainty._scored_statistics(target_rows.float(), drafts, batch, scored, None, 1.3, tokenizer)
    for name, values in mixed.items():
        assert torch.equal(values, cast_first[name]), name


def test_bfloat16_drafts_of_a_float32_target_stay_bfloat16(tokenizer, models, monkeypatch):
    """The drafts' stack takes the widest of the drafts' dtypes, not the target's: bfloat16 drafts
    of a float32 target make a bfloat16 stack (it was float32, a [K, N, V] float32 copy), and the
    table holds the float64 reference's figures on the logits the op was given. (Against each text
    run alone, as check_against_reference does, bfloat16 drafts differ by their batching and padding.)"""
    target, _ = models
    drafts = [sharp_model(tokenizer, seed=4).to(torch.bfloat16), sharp_model(tokenizer, seed=5).to(torch.bfloat16)]
    calls = _spy_on_draft_divergence(monkeypatch)
    table = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS[:3], batch_size=2, progress=False)
    assert calls and [(d.dtype, t.dtype) for d, t in calls] == [(torch.bfloat16, torch.float32)] * len(calls)
    want = [fp.reference.draft_divergence(d.double(), t.double()) for d, t in calls]
    for name in STATISTICS:
        torch.testing.assert_close(torch.tensor(table[name].to_numpy()), torch.cat([w[name] for w in want]),
                                   atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_vocabularies_beyond_padding_are_refused(tokenizer, models):
    target, _ = models
    small = tiny_model("llama", vocab_size=len(tokenizer) - 1)
    with pytest.raises(ValueError, match="differ beyond padding"):
        uncertainty.token_uncertainty(target, [small], tokenizer, TEXTS[:1], progress=False)


@pytest.mark.parametrize("function", ["token_uncertainty", "generate_with_uncertainty"])
def test_a_model_whose_embedding_table_is_smaller_than_the_tokenizer_is_refused_before_any_model_runs(
        tokenizer, models, monkeypatch, function):
    """A draft (or target) with fewer input embeddings than the tokenizer has tokens: refused by
    _shared_vocabulary's rule before any forward pass (it failed inside torch's embedding with
    "IndexError: index out of range in self" once a text held one of the ids it lacks)."""
    target, drafts = models
    small = tiny_model("llama", vocab_size=100, seed=3)

    def no_forward(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    for model in (target, *drafts, small):
        monkeypatch.setattr(model, "forward", no_forward)
    run = getattr(uncertainty, function)
    rows = r"input embedding rows: the target's, then each draft's"
    words = rf"vocabularies \({len(tokenizer)}, {len(tokenizer)}, {len(tokenizer) + 13}, 100 {rows}\) differ"
    with pytest.raises(ValueError, match=words):
        run(target, [*drafts, small], tokenizer, TEXTS[:2], progress=False)
    with pytest.raises(ValueError, match=rf"\(100, \d+, \d+ {rows}\) differ beyond padding"):
        run(small, drafts, tokenizer, TEXTS[:2], progress=False)


@pytest.mark.parametrize("function", ["token_uncertainty", "generate_with_uncertainty"])
def test_drafts_none_is_refused_by_name(tokenizer, models, function):
    target, _ = models
    with pytest.raises(TypeError, match="drafts must be a draft model or a non-empty list of draft models, got None"):
        getattr(uncertainty, function)(target, None, tokenizer, TEXTS[:2], progress=False)


@pytest.mark.parametrize("function, drafts, options, match", [
    ("token_uncertainty", [], {}, "drafts"),
    ("token_uncertainty", ["model"], {}, "drafts"),
    ("token_uncertainty", None, dict(temperature=0), "temperature"),
    ("token_uncertainty", None, dict(texts=[]), "texts is empty"),
    ("token_uncertainty", None, dict(batch_size=0), "batch_size"),
    ("token_uncertainty", None, dict(weights=[0.5, 0.6]), "weights"),
    ("generate_with_uncertainty", None, dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_input(tokenizer, models, function, drafts, options, match):
    target, good_drafts = models
    texts = options.pop("texts", TEXTS)
    with pytest.raises(ValueError, match=match):
        getattr(uncertainty, function)(target, good_drafts if drafts is None else drafts, tokenizer, texts,
                                       progress=False, **options)


def test_bad_weights_are_refused_before_any_model_runs(tokenizer, models, monkeypatch):
    target, drafts = models

    def no_forward(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(target, "forward", no_forward)
    for weights in ([0.5, 0.6], [1.0], torch.tensor([-0.5, 1.5]), [float("nan"), 1.0]):
        for function in (uncertainty.token_uncertainty, uncertainty.generate_with_uncertainty):
            with pytest.raises(ValueError, match="weights"):
                function(target, drafts, tokenizer, TEXTS[:2], weights=weights, progress=False)


def test_models_left_in_train_mode_are_measured_without_dropout(tokenizer):
    """token_uncertainty and generate_with_uncertainty with a target and drafts in train mode with
    dropout (mixed flags) give what they give in eval mode, and every module's flag comes back,
    also after a failed forward. (They ran with dropout on: random, unrepeatable uncertainty.)"""
    target = with_dropout(sharp_model(tokenizer, "gpt2", seed=0))
    drafts = [with_dropout(sharp_model(tokenizer, seed=1)), with_dropout(sharp_model(tokenizer, "gpt2", seed=2))]

    def measure():
        tokens = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS[:3], batch_size=2, progress=False)
        generated = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river", "Stars"],
                                                          max_new_tokens=3, do_sample=False, progress=False)
        return tokens, generated

    def compare(got, want):
        pandas.testing.assert_frame_equal(got[0], want[0])
        assert got[1][0] == want[1][0]
        pandas.testing.assert_frame_equal(got[1][1], want[1][1])

    check_eval_mode([target, *drafts], measure, compare)


# ---------------------------------------------------------------- generation


def greedy_alone(model, tokenizer, prompt, max_new_tokens, **kwargs):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return ids, out[0, ids.shape[1]:]


def test_generate_with_uncertainty_scores_each_continuation(tokenizer, models):
    target, drafts = models
    prompts = ["The river", "A small model can still show", "Stars"]
    generated, table = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, prompts, max_new_tokens=5,
                                                             batch_size=3, do_sample=False, progress=False)
    assert len(generated) == 3
    for index, prompt in enumerate(prompts):
        prompt_ids, new = greedy_alone(target, tokenizer, prompt, 5)
        rows = table[table["text"] == index]
        assert rows["token_id"].tolist() == new.tolist() and rows["position"].tolist() == list(range(5))
        assert generated[index] == tokenizer.decode(new, skip_special_tokens=True)
        _, result = expected_rows(target, drafts, tokenizer, torch.cat([prompt_ids, new[None]], dim=1))
        for name in STATISTICS:  # the continuation's rows are the last five of the whole text's
            torch.testing.assert_close(torch.tensor(rows[name].to_numpy()), result[name][-5:], atol=2e-4, rtol=1e-4)


def test_a_generated_padding_id_is_named_before_the_drafts_read_it(tokenizer, models):
    """A target whose vocabulary is padded past the tokenizer's and which generates a padding id
    at the second prompt's third step: a ValueError naming the id, where the draft (whose
    embedding table ends at len(tokenizer)) failed inside torch's embedding; suppress_tokens,
    as the error says, keeps generate within the tokenizer."""
    _, drafts = models
    target, padding = sharp_model(tokenizer, extra_vocab=8), len(tokenizer) + 3
    prompts, calls = ["The river", "Stars"], []

    def pad_the_second_prompts_third_step(module, args, logits):
        calls.append(logits.shape[1])  # the prompt's forward, then one step each
        if len(calls) == 3:
            logits = logits.clone()
            logits[1, -1, padding] = 1e4
        return logits

    hook = target.get_output_embeddings().register_forward_hook(pad_the_second_prompts_third_step)
    try:
        with pytest.raises(ValueError, match=rf"generated token id {padding} \(continuation 1, step 2\), past the "
                           rf"tokenizer's {len(tokenizer)} tokens.*suppress_tokens=list\(range\({len(tokenizer)}, "
                           rf"{len(tokenizer) + 8}\)\)"):
            uncertainty.generate_with_uncertainty(target, drafts[:1], tokenizer, prompts, max_new_tokens=4,
                                                  progress=False)
        calls.clear()
        suppressed = list(range(len(tokenizer), len(tokenizer) + 8))
        _, table = uncertainty.generate_with_uncertainty(target, drafts[:1], tokenizer, prompts, max_new_tokens=4,
                                                         progress=False, suppress_tokens=suppressed)
    finally:
        hook.remove()
    assert len(table) == 8 and (table["token_id"] < len(tokenizer)).all()
    assert table[list(STATISTICS)].notna().all().all()


def test_several_continuations_per_prompt(tokenizer, models):
    """num_return_sequences = 2 with top_k = 1 sampling (so both continuations are the greedy
    one): continuations prompt after prompt, each scored as its prompt's greedy one; beam search
    is refused."""
    target, drafts = models
    prompts = ["The river", "A small model can still show", "Stars"]
    _, greedy = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, prompts, max_new_tokens=4,
                                                      do_sample=False, progress=False)
    generated, table = uncertainty.generate_with_uncertainty(
        target, drafts, tokenizer, prompts, max_new_tokens=4, batch_size=2, do_sample=True, top_k=1,
        num_return_sequences=2, progress=False)
    assert len(generated) == 6 and table.attrs["num_texts"] == 6
    assert list(uncertainty.sequence_scores(table).index) == list(range(6))
    for text in range(6):
        rows, want = table[table["text"] == text], greedy[greedy["text"] == text // 2]
        assert (rows["prompt"] == text // 2).all() and rows["token_id"].tolist() == want["token_id"].tolist()
        for name in STATISTICS:
            torch.testing.assert_close(torch.tensor(rows[name].to_numpy()), torch.tensor(want[name].to_numpy()),
                                       atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="beam search"):
        uncertainty.generate_with_uncertainty(target, drafts, tokenizer, prompts, num_beams=2, progress=False)


def test_temperature_is_generates_sampling_temperature_too(tokenizer, models):
    """Sampling at temperature 1e-3 is greedy (the argument reaches generate), and the scores are
    at that temperature: those of token_uncertainty at 1e-3 on the same text."""
    target, drafts = models
    _, greedy = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=5,
                                                      do_sample=False, progress=False)
    torch.manual_seed(0)
    generated, sampled = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"],
                                                               max_new_tokens=5, do_sample=True, temperature=1e-3,
                                                               progress=False)
    assert sampled["token_id"].tolist() == greedy["token_id"].tolist()
    cold = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=5,
                                                 do_sample=False, temperature=1e-3, progress=False)[1]
    for name in STATISTICS:
        torch.testing.assert_close(torch.tensor(sampled[name].to_numpy()), torch.tensor(cold[name].to_numpy()))
    assert not torch.allclose(torch.tensor(sampled["epistemic"].to_numpy()), torch.tensor(greedy["epistemic"].to_numpy()))


def test_temperature_of_a_generation_config_passed_to_generate(tokenizer, models):
    """A generation_config given among generate's arguments is the one sampled with: its
    temperature is the scores' (default), and an explicit temperature overrides both."""
    from transformers import GenerationConfig

    target, drafts = models
    sampled = {}
    for temperature in (None, 1e-3):
        config = GenerationConfig(do_sample=True, temperature=1e-3 if temperature is None else 50.0, top_k=0,
                                  max_new_tokens=5)
        torch.manual_seed(0)
        sampled[temperature] = uncertainty.generate_with_uncertainty(
            target, drafts, tokenizer, ["The river"], max_new_tokens=5, generation_config=config,
            temperature=temperature, progress=False)[1]
    cold = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=5,
                                                 do_sample=False, temperature=1e-3, progress=False)[1]
    for table in sampled.values():
        assert table["token_id"].tolist() == cold["token_id"].tolist()  # sampled at 1e-3: greedy
        for name in STATISTICS:
            torch.testing.assert_close(torch.tensor(table[name].to_numpy()), torch.tensor(cold[name].to_numpy()))


def test_sampling_settings_of_the_model_beside_a_passed_config(tokenizer, models, monkeypatch):
    """A passed generation_config that leaves do_sample, temperature and num_beams unset runs with
    the model's (transformers completes it from the model's generation config), and so is scored:
    sampling at the model's temperature 1e-3 is scored as the cold greedy call (it was scored at
    T = 1, ~1000x off), and the model's beam search is refused by name (it was an IndexError)."""
    from transformers import GenerationConfig

    target, drafts = models
    cold = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=5,
                                                 do_sample=False, temperature=1e-3, progress=False)[1]
    for name, value in (("do_sample", True), ("temperature", 1e-3), ("top_k", 0)):
        monkeypatch.setattr(target.generation_config, name, value)
    table = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=5,
                                                  generation_config=GenerationConfig(max_new_tokens=5),
                                                  progress=False)[1]
    assert table["token_id"].tolist() == cold["token_id"].tolist()  # sampled at 1e-3: greedy
    for name in STATISTICS:
        torch.testing.assert_close(torch.tensor(table[name].to_numpy()), torch.tensor(cold[name].to_numpy()))
    monkeypatch.setattr(target.generation_config, "do_sample", False)
    monkeypatch.setattr(target.generation_config, "num_beams", 2)
    with pytest.raises(ValueError, match="does not support beam search"):
        uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=3,
                                              generation_config=GenerationConfig(max_new_tokens=3), progress=False)


def test_a_passed_config_beside_the_models_sampling_logs_no_warning(tokenizer, models, monkeypatch):
    """A passed generation_config that leaves do_sample to the model's sampling one (e.g. an
    instruct model's do_sample=True, temperature=0.6): the temperature folded into its copy comes
    with do_sample=True, so transformers does not log that it "may be ignored" (it did: the copy
    alone read as greedy), and generate samples at that temperature as before."""
    from transformers import GenerationConfig

    from .transformers_helpers import transformers_warnings

    target, drafts = models
    monkeypatch.setattr(target.generation_config, "do_sample", True)
    monkeypatch.setattr(target.generation_config, "temperature", 0.6)
    calls, generate = [], target.generate

    def recording(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(target, "generate", recording)
    with transformers_warnings() as messages:
        uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=3,
                                              generation_config=GenerationConfig(max_new_tokens=3), progress=False)
    # (4.5x also logs that a passed config's defaults were modified to the model's: generate's own, for any such config)
    assert not [message for message in messages if "may be ignored" in message]
    (passed,) = calls
    assert (passed["generation_config"].do_sample, passed["generation_config"].temperature) == (True, 0.6)


def test_a_generation_config_is_passed_to_generate_alone(tokenizer, models, monkeypatch):
    """generate gets a passed generation_config's copy with the scoring's own settings folded
    in, not the config beside generation fields (deprecated by transformers); the caller's
    config is left as it was."""
    from transformers import GenerationConfig

    target, drafts = models
    config = GenerationConfig(do_sample=False, max_new_tokens=2, eos_token_id=None)
    kept = config.to_dict()
    calls, generate = [], target.generate

    def recording(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(target, "generate", recording)
    generated, table = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"],
                                                             max_new_tokens=4, generation_config=config,
                                                             progress=False)
    (passed,) = calls
    assert set(passed) == {"input_ids", "attention_mask", "generation_config"}
    folded = passed["generation_config"]
    assert folded is not config and config.to_dict() == kept
    assert (folded.max_new_tokens, folded.output_logits, folded.return_dict_in_generate) == (4, True, True)
    assert len(table) == 4


@pytest.mark.parametrize("given", ["argument", "generation_config", "model's, beside a passed config"])
def test_generation_is_scored_up_to_its_first_eos(tokenizer, models, given, monkeypatch):
    """The eos generate stops at, given as an argument, in a generation_config passed to
    generate, or in the model's generation config when the passed one leaves it unset
    (transformers completes a passed config from the model's). Ignored, the padding after it was
    scored as generated tokens."""
    import copy

    from transformers import GenerationConfig

    target, drafts = models
    _, new = greedy_alone(target, tokenizer, "The river", 6)
    _, other = greedy_alone(target, tokenizer, "Stars", 6)
    stop = int(new[2])
    first_stop = new.tolist().index(stop)
    assert stop not in other.tolist()  # the other row goes on: the stopped one is padded
    if given == "argument":
        options = dict(eos_token_id=stop)
    elif given.startswith("model's"):
        monkeypatch.setattr(target.generation_config, "eos_token_id", stop)
        options = dict(generation_config=GenerationConfig(max_new_tokens=6))
    else:
        options = dict(generation_config=copy.deepcopy(target.generation_config))
        options["generation_config"].eos_token_id = stop
    generated, table = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river", "Stars"],
                                                             max_new_tokens=6, progress=False, **options)
    assert table[table["text"] == 0]["token_id"].tolist() == new[:first_stop + 1].tolist()
    assert table[table["text"] == 1]["token_id"].tolist() == other.tolist()
    stopped = uncertainty._continuation_mask(torch.tensor([[5, 9, 7, 9, 3], [1, 2, 3, 4, 5]]), [9, 4])
    assert stopped.tolist() == [[True, True, False, False, False], [True, True, True, True, False]]


def test_a_row_ended_by_a_stopping_criterion_is_scored_up_to_its_end(tokenizer, models):
    """A row that a stopping criterion (not an eos) ends early is filled by generate with the pad
    token from there on: its rows in the table are the tokens up to the stop, as generated alone,
    and the other rows go on. The pad filling was scored as generated tokens (12 rows, not 3)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopFirstRow(StoppingCriteria):  # ends the batch's first row after 3 new tokens; the others go on
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            done[0] = input_ids.shape[1] - prompt_length >= 3
            return done

    target, drafts = models
    prompt_length = tokenizer(["The river", "Stars"], padding=True, return_tensors="pt")["input_ids"].shape[1]
    criterion = StopFirstRow()
    _, new = greedy_alone(target, tokenizer, "The river", 8)
    _, other = greedy_alone(target, tokenizer, "Stars", 8)
    assert tokenizer.pad_token_id not in other.tolist()
    generated, table = uncertainty.generate_with_uncertainty(
        target, drafts, tokenizer, ["The river", "Stars"], max_new_tokens=8, do_sample=False, progress=False,
        stopping_criteria=StoppingCriteriaList([criterion]))
    assert table[table["text"] == 0]["token_id"].tolist() == new[:3].tolist()
    assert table[table["text"] == 1]["token_id"].tolist() == other.tolist()
    assert uncertainty.sequence_scores(table)["num_tokens"].tolist() == [3, 8]
    assert generated[0] == tokenizer.decode(new[:3], skip_special_tokens=True)
    filled = uncertainty._continuation_mask(torch.tensor([[5, 0, 7, 0, 0], [1, 2, 3, 4, 5]]), [9], pad_id=0)
    assert filled.tolist() == [[True, True, True, False, False], [True, True, True, True, True]]
    # a pad id that is an eos (a tokenizer without pad): the eos rule ends the row, its eos scored
    ended = uncertainty._continuation_mask(torch.tensor([[5, 2, 2, 2], [2, 7, 2, 8]]), [2], pad_id=2)
    assert ended.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_trailing_pad_ids_are_scored_when_only_eos_ends_a_row(tokenizer, models):
    """Without another stopping criterion only an eos ends a row, so a continuation whose last
    tokens are the pad id generated them: all are scored (the pad-filling rule is for rows that
    stop_strings, stopping_criteria or max_time end)."""
    target, drafts = models
    pad, steps = tokenizer.pad_token_id, []

    def pad_from_the_third_step(module, args, logits):
        steps.append(None)  # the prompt's forward, then one per step
        if len(steps) >= 3:
            logits = logits.clone()
            logits[:, -1, pad] = 1e4
        return logits

    hook = target.get_output_embeddings().register_forward_hook(pad_from_the_third_step)
    try:
        _, table = uncertainty.generate_with_uncertainty(target, drafts, tokenizer, ["The river"], max_new_tokens=5,
                                                         do_sample=False, progress=False)
    finally:
        hook.remove()
    assert len(table) == 5 and table["token_id"].tolist()[2:] == [pad] * 3


def test_stop_strings_are_passed_to_generate_with_the_tokenizer(tokenizer, models):
    """stop_strings need the tokenizer in generate, which is generate_with_uncertainty's own
    argument (tokenizer= cannot be passed on): it is passed on, and the row that meets the stop
    string is scored up to it. generate raised that it could not locate a tokenizer."""
    target, drafts = models
    _, new = greedy_alone(target, tokenizer, "The river", 8)
    _, other = greedy_alone(target, tokenizer, "Stars", 8)
    # the first new token after the first that is whole text (not a byte of a character), met nowhere before
    end, stop = next((k, text) for k, text in ((k, tokenizer.decode(new[k:k + 1])) for k in range(1, 7))
                     if text.strip() and "\ufffd" not in text and text not in tokenizer.decode(other)
                     and text not in tokenizer.decode(new[:k]))
    generated, table = uncertainty.generate_with_uncertainty(
        target, drafts, tokenizer, ["The river", "Stars"], max_new_tokens=8, do_sample=False, progress=False,
        stop_strings=[stop])
    assert table[table["text"] == 0]["token_id"].tolist() == new[:end + 1].tolist()
    assert table[table["text"] == 1]["token_id"].tolist() == other.tolist()


# ---------------------------------------------------------------- sequence scores and AUROC


def test_sequence_scores(tokenizer, models):
    target, drafts = models
    table = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS, batch_size=4, progress=False)
    scores = uncertainty.sequence_scores(table)
    assert list(scores.index) == list(range(len(TEXTS)))
    for index in range(len(TEXTS) - 1):
        rows = table[table["text"] == index]
        assert scores.loc[index, "num_tokens"] == len(rows)
        for name in uncertainty.MEASURES:
            assert scores.loc[index, f"{name}_sum"] == pytest.approx(rows[name].sum())
            assert scores.loc[index, f"{name}_mean"] == pytest.approx(rows[name].mean())
    empty = scores.loc[len(TEXTS) - 1]
    assert empty["num_tokens"] == 0 and empty["epistemic_sum"] == 0 and pandas.isna(empty["epistemic_mean"])


def test_sequence_scores_refuses_what_is_not_a_token_table():
    """(a list failed with "'list' object has no attribute 'attrs'", a table without the measures
    with a KeyError)"""
    with pytest.raises(TypeError, match="tokens must be the token table .* got list"):
        uncertainty.sequence_scores([1, 2])
    with pytest.raises(ValueError, match="it has no column jsd, kl_mixture_target"):
        uncertainty.sequence_scores(pandas.DataFrame({"text": [0, 0], "epistemic": [0.1, 0.2]}))


def pairwise_auroc(scores, labels):
    pairs = [(s, t) for s, l in zip(scores, labels) if l for t, m in zip(scores, labels) if not m]
    return sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_the_pairwise_count(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (40,), generator=generator).double()  # many ties
    labels = torch.rand(40, generator=generator) < 0.4
    assert uncertainty.auroc(scores, labels) == pytest.approx(pairwise_auroc(scores.tolist(), labels.tolist()))
    assert uncertainty.auroc(scores.numpy(), labels.int().tolist()) == pytest.approx(
        uncertainty.auroc(scores, labels))


def test_auroc_of_filtered_pandas_columns():
    """Series whose index has gaps (rows dropped, as the NaN error tells one to) or is shuffled
    are taken by position, as their values stand."""
    pandas = pytest.importorskip("pandas")
    table = pandas.DataFrame({"score": [0.1, float("nan"), 0.9, 0.8, 0.2], "label": [0, 1, 1, 1, 0]},
                             index=[5, 6, 7, 8, 9])
    kept = table.dropna()
    assert uncertainty.auroc(kept["score"], kept["label"]) == 1.0
    shuffled = kept.sample(frac=1.0, random_state=0)
    assert uncertainty.auroc(shuffled["score"], shuffled["label"]) == 1.0
    assert uncertainty.auroc(kept["score"], kept["label"].astype(bool)) == 1.0


def test_auroc_copies_a_pandas_columns_values():
    """A Series' array is read-only under pandas' copy-on-write: _flat copies it rather than
    wrapping it in a tensor that shares it (torch warned on stderr: 'The given NumPy array is not
    writable', e.g. under the availability command's AUROC)."""
    import numpy

    column = pandas.Series([0.1, 0.9, 0.4])
    values = uncertainty._flat(column, "labels")
    assert not numpy.shares_memory(values.numpy(), column.to_numpy())
    assert values.tolist() == [0.1, 0.9, 0.4]


def test_auroc_extremes_and_bad_input():
    assert uncertainty.auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert uncertainty.auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert uncertainty.auroc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    for scores, labels, match in [([0.1, 0.2], [0, 1, 1], "same length"), ([0.1, 0.2], [1, 1], "both classes"),
                                  ([0.1, 0.2], [0, 2], "0 / 1"), ([0.1, float("nan")], [0, 1], "NaN")]:
        with pytest.raises(ValueError, match=match):
            uncertainty.auroc(scores, labels)
    with pytest.raises(TypeError, match="^labels must hold numbers"):  # (a raw numpy-to-torch error before)
        uncertainty.auroc([0.1, 0.2, 0.3], ["yes", "no", "yes"])


def test_a_table_as_texts_is_refused():
    """A pandas DataFrame iterates its column names: df[["text"]] was read as the one text "text"."""
    pandas = pytest.importorskip("pandas")
    from fastprobe.methods._batching import as_texts

    table = pandas.DataFrame({"text": ["one text", "another"]})
    with pytest.raises(TypeError, match="^texts must be a string or a list of strings, got DataFrame"):
        as_texts(table[["text"]])
    assert as_texts(table["text"]) == ["one text", "another"]


def test_inputs_are_left_alone(tokenizer, models):
    target, drafts = models
    before = [p.detach().clone() for p in itertools.chain(target.parameters(), drafts[0].parameters())]
    weights = torch.tensor([0.5, 0.5])
    uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS[:2], weights=weights, progress=False)
    after = list(itertools.chain(target.parameters(), drafts[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and weights.tolist() == [0.5, 0.5]


# ---------------------------------------------------------------- the command


def test_uncertainty_command(tokenizer, models, tmp_path, capsys):
    from fastprobe import cli

    target, drafts = models
    folders = []
    for name, model in [("target", target)] + [(f"draft{i}", d) for i, d in enumerate(drafts)]:
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:4]) + "\n\n")
    csv = tmp_path / "tokens.csv"
    code = cli.main(["uncertainty", "--target", folders[0], "--drafts", *folders[1:], "--texts", str(texts),
                     "--csv", str(csv), "--no-progress", "--top", "3"])
    printed = capsys.readouterr().out
    assert code == 0 and "2 drafts, 4 texts" in printed
    written = pandas.read_csv(csv, keep_default_na=False)
    expected = uncertainty.token_uncertainty(target, drafts, tokenizer, TEXTS[:4], progress=False)
    assert written["token_id"].tolist() == expected["token_id"].tolist()
    torch.testing.assert_close(torch.tensor(written["epistemic"].to_numpy()),
                               torch.tensor(expected["epistemic"].to_numpy()), atol=1e-5, rtol=1e-5)
    top = expected.nlargest(3, "epistemic")
    assert f"{top['epistemic'].iloc[0]:.4f}" in printed


def test_uncertainty_command_bad_paths(tmp_path, capsys):
    from fastprobe import cli

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(["uncertainty", "--target", str(tmp_path / "missing"), "--drafts", "x", "--texts", str(empty)]) == 2
    assert "holds no text" in capsys.readouterr().err


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=30).filter(
    lambda pairs: len({label for _, label in pairs}) == 2))
def test_auroc_properties(pairs):
    scores, labels = [float(s) for s, _ in pairs], [label for _, label in pairs]
    value = uncertainty.auroc(scores, labels)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(pairwise_auroc(scores, labels))
    assert uncertainty.auroc([-s for s in scores], labels) == pytest.approx(1.0 - value)  # reversed order
    assert uncertainty.auroc([s ** 3 + 7 for s in scores], labels) == pytest.approx(value)  # monotone map


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=8), min_size=1, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1), st.sets(st.integers(0, 6), max_size=3))
def test_continuation_mask_keeps_tokens_up_to_the_first_eos(rows, eos):
    kept = uncertainty._continuation_mask(torch.tensor(rows), sorted(eos)).tolist()
    for row, mask in zip(rows, kept):
        stop = next((i for i, token in enumerate(row) if token in eos), len(row) - 1)
        assert mask == [i <= stop for i in range(len(row))]


def test_texts_longer_than_a_drafts_learned_positions_are_refused(tokenizer):
    """A GPT-2 draft has a table of n_positions learned positions (rotary models have no such
    limit): a longer batch is refused naming max_length, before any index runs past the table;
    the default max_length fits it."""
    from fastprobe.methods._batching import learned_positions

    target, short_draft = sharp_model(tokenizer), tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=12)
    assert learned_positions(target) is None and learned_positions(short_draft) == 12
    assert learned_positions(tiny_model("bert")) == 8192 and learned_positions(tiny_model("gpt2")) == 8192
    long_text = DEMO_TEXTS[0] + " " + DEMO_TEXTS[1]
    with pytest.raises(ValueError, match=r"but a draft \(GPT2LMHeadModel\) has learned positions for 12 tokens only; "
                                         "pass max_length <= 12"):
        uncertainty.token_uncertainty(target, [short_draft], tokenizer, [long_text], max_length=512, progress=False)
    table = uncertainty.token_uncertainty(target, [short_draft], tokenizer, [long_text], progress=False)
    assert len(table) == 11
    with pytest.raises(ValueError, match="plus 8 tokens that follow them, but .* for 12 tokens only; pass max_length <= 4"):
        uncertainty.generate_with_uncertainty(target, [short_draft], tokenizer, ["Short."], max_new_tokens=8,
                                              max_length=512, progress=False)
    with pytest.raises(ValueError, match="generate fewer new tokens"):
        uncertainty.generate_with_uncertainty(target, [short_draft], tokenizer, ["Short."], max_new_tokens=12,
                                              progress=False)
    generated, _ = uncertainty.generate_with_uncertainty(target, [short_draft], tokenizer, ["Short."], max_new_tokens=4,
                                                         max_length=8, progress=False)
    assert len(generated) == 1


@pytest.mark.parametrize("texts, error", [(None, TypeError), (7, TypeError), ([], ValueError), (["a", None], TypeError)])
def test_texts_and_prompts_that_are_not_strings_are_named(tokenizer, models, texts, error):
    target, drafts = models
    with pytest.raises(error, match="^texts"):
        uncertainty.token_uncertainty(target, drafts, tokenizer, texts, progress=False)
    with pytest.raises(error, match="^prompts"):
        uncertainty.generate_with_uncertainty(target, drafts, tokenizer, texts, progress=False)


def test_a_target_or_draft_without_logits_is_refused(tokenizer):
    """(BERT's encoder, BertModel, returns hidden states only), as the target or as a draft"""
    encoder = tiny_model("bert", vocab_size=len(tokenizer), num_layers=1)
    causal = tiny_model("llama", vocab_size=len(tokenizer), num_layers=1)
    for target, drafts in ((encoder, [causal]), (causal, [causal, encoder])):
        with pytest.raises(TypeError, match="draft uncertainty needs causal language models with logits, got BertM"):
            uncertainty.token_uncertainty(target, drafts, tokenizer, DEMO_TEXTS[:2], progress=False)


def test_positions_past_the_config_name_the_target_or_the_draft(tokenizer):
    """generate_with_uncertainty on prompts whose generation runs past a config's
    max_position_embeddings: the target, fed back all but its last generated token, is named
    (on every call: transformers' "friendly reminder" is said once a process); a draft, which
    reads every generated token by teacher forcing, is named when it is the one configured for
    fewer positions."""
    prompt = "The river ran past the old mill"
    length = len(tokenizer(prompt)["input_ids"])
    target = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=length + 2)
    draft = tiny_model("llama", vocab_size=len(tokenizer), seed=1, max_position_embeddings=length + 8)
    for _ in range(2):
        with pytest.warns(UserWarning, match=rf"texts of {length} tokens plus 5 tokens that follow them run past "
                                             rf"the {length + 2} positions LlamaForCausalLM's config gives"):
            uncertainty.generate_with_uncertainty(target, [draft], tokenizer, [prompt], max_new_tokens=6,
                                                  max_length=512, progress=False)
    roomy_target = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=length + 8)
    short_draft = tiny_model("llama", vocab_size=len(tokenizer), seed=1, max_position_embeddings=length + 5)
    with pytest.warns(UserWarning, match=rf"texts of {length} tokens plus 6 tokens that follow them run past the "
                                         rf"{length + 5} positions a draft \(LlamaForCausalLM\)'s config gives"):
        uncertainty.generate_with_uncertainty(roomy_target, [short_draft], tokenizer, [prompt], max_new_tokens=6,
                                              max_length=512, progress=False)


def test_learned_positions_count_each_models_own_following_tokens(tokenizer):
    """generate_with_uncertainty with learned positions (GPT-2): the target is fed back all but its
    last generated token, a draft reads every one, so with the default max_length a target that
    has fewer positions than its draft runs (it was refused, its limit checked against the
    draft's count), and a draft with too few is named, with the max_length that fits it."""
    prompt = " ".join(["The river ran past the old mill and on to the sea"] * 4)
    target = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=24)
    draft = tiny_model("gpt2", vocab_size=len(tokenizer), seed=1, n_positions=64)
    generated, _ = uncertainty.generate_with_uncertainty(target, [draft], tokenizer, [prompt], max_new_tokens=4,
                                                         max_length=None, progress=False)
    assert len(generated) == 1
    short_draft = tiny_model("gpt2", vocab_size=len(tokenizer), seed=1, n_positions=24)
    with pytest.raises(ValueError, match=r"plus 4 tokens that follow them, but a draft \(GPT2LMHeadModel\) has "
                                         r"learned positions for 24 tokens only; pass max_length <= 20 "):
        uncertainty.generate_with_uncertainty(target, [short_draft], tokenizer, [prompt], max_new_tokens=4,
                                              max_length=21, progress=False)
