"""cd_convert on HuggingFace transformers models built from tiny configs, with no example inputs.

Per family: every dropout the model applies in training becomes a learned site (an aten-level check sees no
fixed-rate dropout and no attention kernel with dropout_p > 0), every added parameter gets a gradient from
the data loss alone, eval output equals the original's, the regulariser's weight terms match a hand
computation, Monte Carlo mode samples every site, and freeze() gives plain PyTorch with the same output.
"""

import copy
import inspect
import math
import types

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import cd_convert as cd  # noqa: E402
from cd_convert.layers import ConcreteDropoutBase  # noqa: E402
from hf_zoo import CORE_FAMILIES, HF_FAMILIES, _self_check, fixed_rate_dropout_calls  # noqa: E402

#: Families whose report must show sites that feed weight layers (classifier heads, FFN second layers).
WITH_WEIGHT_TERMS = {"bert", "distilbert", "deberta-v2", "t5", "bart", "whisper", "roberta", "electra"}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def converted_cases():
    """family -> (original, converted, inputs, loss_fn); converted with no example inputs."""
    cases = {}
    for name, build in HF_FAMILIES.items():
        original, inputs, loss_fn = build()
        converted = cd.convert(copy.deepcopy(original), weight_regularizer=1e-2, dropout_regularizer=1e-3)
        cases[name] = (original, converted, inputs, loss_fn)
    return cases


def _first_output(output):
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output[0]


def test_detector_sees_module_functional_and_attention_dropout():
    _self_check()


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_no_fixed_rate_dropout_left(converted_cases, family):
    original, converted, inputs, _ = converted_cases[family]
    assert fixed_rate_dropout_calls(original.train(), inputs), "the original must apply dropout in training"
    assert fixed_rate_dropout_calls(converted.train(), inputs) == []
    report = cd.report(converted)
    assert not [r for r in report.rows if r.status in ("not selected", "unsupported", "left fused")]


def _attention_interface_modules(model):
    """Module instances whose class's forward selects an attention function (transformers' interface)."""
    found = set()
    for module in model.modules():
        try:
            source = inspect.getsource(inspect.unwrap(type(module).forward))
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in source:
            found.add(id(module))
    return found


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_one_attention_site_per_attention_module(converted_cases, family):
    """A shared attention function is keyed per owning module: one learned rate per attention module."""
    original, converted, _, _ = converted_cases[family]
    rows = [r for r in cd.report(converted).rows if r.kind == "attention" and r.status == "converted"]
    assert len(rows) == len(_attention_interface_modules(original))
    assert len({r.name.rpartition(".")[0] for r in rows}) == len(rows)


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_every_site_gets_a_gradient_from_the_data_loss(converted_cases, family):
    _, converted, inputs, loss_fn = converted_cases[family]
    converted.train().zero_grad()
    torch.manual_seed(1)
    loss_fn(converted(**inputs)).backward()
    sites = [(n, p) for n, p in converted.named_parameters() if n.endswith("p_logit")]
    assert sites
    silent = [n for n, p in sites if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert silent == []


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_eval_output_equals_original(converted_cases, family):
    original, converted, inputs, _ = converted_cases[family]
    with torch.no_grad():
        assert torch.equal(_first_output(original.eval()(**inputs)), _first_output(converted.eval()(**inputs)))


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_weight_terms_match_a_hand_computation(converted_cases, family):
    """With dr = 0 the regulariser is wr * sum over (site, consumer) of ||W||^2 / (1 - p)."""
    _, converted, _, _ = converted_cases[family]
    wr = 1e-2
    cd.set_regularizer(converted, weight_regularizer=wr, dropout_regularizer=0.0)
    try:
        rates = cd.dropout_rates(converted)
        expected = 0.0
        for row in cd.report(converted).rows:
            weights = {w for part in row.consumer.split(" | ") for w in part.split(", ") if w}
            for weight in weights:
                # By attribute: a weight-normed weight (wav2vec2's positional conv) is computed, not a Parameter.
                module, _, attr = weight.rpartition(".")
                squared = float(getattr(converted.get_submodule(module), attr).detach().double().pow(2).sum())
                expected += wr * squared / (1.0 - rates[row.name])
        if family in WITH_WEIGHT_TERMS:
            assert expected > 0, "sites feeding weight layers must carry weight terms"
        assert float(cd.regularization(converted).detach()) == pytest.approx(expected, rel=1e-5, abs=1e-12)
    finally:
        cd.set_regularizer(converted, weight_regularizer=1e-2, dropout_regularizer=1e-3)


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_mc_mode_samples_every_site(converted_cases, family):
    _, converted, inputs, _ = converted_cases[family]
    sites = {m: 0 for m in converted.modules() if isinstance(m, ConcreteDropoutBase)}

    def count(module, args, output):
        if module.active and output is not args[0]:
            sites[module] += 1

    handles = [m.register_forward_hook(count) for m in sites]
    try:
        with cd.mc_mode(converted), torch.no_grad():
            torch.manual_seed(0)
            first = _first_output(converted(**inputs))
            torch.manual_seed(1)
            second = _first_output(converted(**inputs))
            assert fixed_rate_dropout_calls(converted, inputs) == []
    finally:
        for handle in handles:
            handle.remove()
    assert not converted.training
    assert all(n > 0 for n in sites.values())
    assert not torch.equal(first, second)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_freeze_gives_plain_pytorch_with_the_same_eval_output(converted_cases, family):
    original, converted, inputs, _ = converted_cases[family]
    frozen = cd.freeze(converted)
    assert not any(isinstance(m, ConcreteDropoutBase) for m in frozen.modules())
    assert not [k for k in frozen.state_dict() if k.endswith("p_logit")]
    with torch.no_grad():
        assert torch.equal(_first_output(original.eval()(**inputs)), _first_output(frozen.eval()(**inputs)))
    # In training the frozen model drops at the learned rates with the model's own code again.
    assert fixed_rate_dropout_calls(frozen.train(), inputs)


def test_freeze_writes_learned_rates_where_the_model_reads_them():
    original, _, _ = HF_FAMILIES["bert"]()
    converted = cd.convert(original, dataset_size=100)
    with torch.no_grad():
        for name, param in converted.named_parameters():
            if name.endswith("p_logit"):
                param.fill_(math.log(0.3 / 0.7))  # p = 0.3 everywhere
    frozen = cd.freeze(converted)
    attention = frozen.bert.encoder.layer[0].attention.self
    assert isinstance(attention.dropout, nn.Dropout) and attention.dropout.p == pytest.approx(0.3)
    assert frozen.bert.embeddings.dropout.p == pytest.approx(0.3)

    bart, _, _ = HF_FAMILIES["bart"]()
    converted = cd.convert(bart, dataset_size=100)
    report = cd.report(converted)
    layer = "model.encoder.layers.0"
    shared = [r for r in report.rows if r.name.startswith(layer + ".forward_dropout") and r.kind == "functional"]
    # The layer's two calls reading self.dropout are one site; self.activation_dropout is another.
    assert len(shared) == 2
    for name, param in converted.named_parameters():
        if name.endswith("p_logit"):
            with torch.no_grad():
                param.fill_(math.log(0.2 / 0.8))
    frozen = cd.freeze(converted)
    assert frozen.model.encoder.layers[0].dropout == pytest.approx(0.2)
    assert frozen.model.encoder.layers[0].activation_dropout == pytest.approx(0.2)
    assert frozen.model.encoder.layers[0].self_attn.dropout == pytest.approx(0.2)


def test_rate_read_modules_are_reported_and_kept():
    original, inputs, _ = HF_FAMILIES["bert"]()
    converted = cd.convert(original, dataset_size=100)
    rows = {r.name: r for r in cd.report(converted).rows}
    holder = rows["bert.encoder.layer.0.attention.self.dropout"]
    assert holder.status == "rate read"
    assert type(converted.bert.encoder.layer[0].attention.self.dropout) is nn.Dropout
    site = rows["bert.encoder.layer.0.attention.self.forward_dropout"]
    assert site.kind == "attention" and site.status == "converted"
    replanned = {r.name: r for r in cd.plan(converted).rows}
    assert replanned["bert.encoder.layer.0.attention.self.dropout"].status == "rate read"


def test_zero_rate_attention_policy():
    """Rate-0 attention dropout (Llama's default) is learned by default, and kept fused on request."""
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    converted = cd.convert(model, dataset_size=100)
    assert list(cd.dropout_rates(converted).values()) == [pytest.approx(0.1)] * 2
    for options, status in (
        (dict(include_zero_rate=False), "skipped (p=0)"),
        (dict(fused_attention=False), "left fused"),
    ):
        report = cd.plan(model, dataset_size=100, **options)
        assert [r.status for r in report.rows] == [status, status]


def test_explicit_example_inputs_as_a_dict():
    original, inputs, _ = HF_FAMILIES["vit"]()
    converted = cd.convert(original, dataset_size=100, example_inputs=dict(inputs))
    assert len([r for r in cd.report(converted).rows if r.kind == "attention"]) == 2


def test_packed_flash_attention_batches_are_refused():
    original, inputs, _ = HF_FAMILIES["llama"]()
    converted = cd.convert(original, dataset_size=100).train()
    config = converted.config
    saved = config.__dict__["_attn_implementation_internal"]
    config.__dict__["_attn_implementation_internal"] = "flash_attention_2"
    try:
        positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
        with pytest.raises(RuntimeError, match="packed sequences"):
            converted(input_ids=inputs["input_ids"], position_ids=positions)
        assert config.__dict__["_attn_implementation_internal"] == "flash_attention_2"
    finally:
        config.__dict__["_attn_implementation_internal"] = saved


def test_attention_implementation_is_restored_after_each_forward():
    original, inputs, loss_fn = HF_FAMILIES["t5"]()
    converted = cd.convert(original, dataset_size=100).train()
    configs = {id(m.config): m.config for m in converted.modules() if hasattr(m, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    assert "sdpa" in before.values()
    loss_fn(converted(**inputs)).backward()
    assert {k: c._attn_implementation for k, c in configs.items()} == before


def test_transposed_linear_is_a_consumer():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.2), Conv1D(5, 6))
    converted = cd.convert(model, dataset_size=10, example_inputs=(torch.randn(3, 4),))
    row = next(r for r in cd.report(converted).rows if r.name == "2")
    assert row.consumer == "3.weight"
    application = cd.convert.__globals__["get_collector"](converted).applications[0]
    assert application.units == 6


def test_trainer_adds_the_regulariser_once_per_step(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from cd_convert.integrations.transformers import ConcreteDropoutTrainer

    original, inputs, _ = HF_FAMILIES["bert"]()
    converted = cd.convert(original, weight_regularizer=1e-2, dropout_regularizer=1e-2)
    labels = torch.tensor([0, 1])
    dataset = [{"input_ids": inputs["input_ids"][i], "labels": labels[i]} for i in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = ConcreteDropoutTrainer(model=converted, args=args, train_dataset=dataset)
    decay = trainer.get_decay_parameter_names(converted)
    assert decay and not [n for n in decay if n.endswith("p_logit")]
    batch = {"input_ids": inputs["input_ids"], "labels": labels}
    converted.train()
    torch.manual_seed(0)
    with_term = trainer.compute_loss(converted, dict(batch))
    torch.manual_seed(0)
    data_only = transformers.Trainer.compute_loss(trainer, converted, dict(batch))
    assert float((with_term - data_only).detach()) == pytest.approx(
        float(cd.regularization(converted).detach()), rel=1e-5
    )
    before = {n: p.detach().clone() for n, p in converted.named_parameters() if n.endswith("p_logit")}
    trainer.train()
    after = dict(converted.named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in before)


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_mc_predict_takes_keyword_inputs_and_model_outputs(converted_cases, family):
    original, converted, inputs, _ = converted_cases[family]
    with torch.no_grad():
        logits = _first_output(original.eval()(**inputs))
    converted.train()
    pred = cd.mc_predict(converted, inputs, samples=6, generator=torch.Generator().manual_seed(0))
    assert pred.probs.shape == logits.shape
    assert torch.allclose(pred.probs.sum(-1), torch.ones(logits.shape[:-1]), atol=1e-5)
    assert (pred.mutual_information > 0).any()
    again = cd.mc_predict(converted, inputs, samples=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pred.probs, again.probs)
    assert converted.training  # modes restored


def test_a_model_on_the_meta_device_converts_without_memory():
    """Planning a large model: built on the meta device, converted in place, sites as on a real device."""
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        attention_dropout=0.1,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    converted = cd.convert(model, dataset_size=100, inplace=True)
    rows = [r for r in cd.report(converted).rows if r.kind == "attention"]
    assert len(rows) == 3 and all(r.status == "converted" for r in rows)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_converting_twice_keeps_the_sites(converted_cases, family):
    _, converted, inputs, loss_fn = converted_cases[family]
    again = cd.convert(converted, dataset_size=100)
    assert cd.dropout_rates(again).keys() == cd.dropout_rates(converted).keys()
    rows = cd.report(again).rows
    assert len({r.name for r in rows}) == len(rows)
    assert {r.status for r in rows} <= {"existing", "rate read", "not called", "not a dropout site"}
    again.train()
    loss_fn(again(**inputs)).backward()
    assert fixed_rate_dropout_calls(again, inputs) == []


def test_trainer_refuses_an_unconverted_model(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from cd_convert.integrations.transformers import ConcreteDropoutTrainer

    original, _, _ = HF_FAMILIES["bert"]()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(cd.ConversionError, match="has not been converted"):
        ConcreteDropoutTrainer(model=original, args=args)


def test_trainer_without_transformers_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import cd_convert.integrations.transformers as hf\n"
        "try:\n    hf.ConcreteDropoutTrainer\nexcept ImportError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "cd_convert[transformers]"' in out


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_a_mixed_precision_training_step_with_the_regulariser(family):
    """What users run: bf16 autocast, data loss + regulariser, an optimizer step; every rate moves."""
    original, inputs, loss_fn = HF_FAMILIES[family]()
    converted = cd.convert(original, dataset_size=100).train()
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in converted.named_parameters() if n.endswith("p_logit")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(converted(**inputs)) + cd.regularization(converted)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = dict(converted.named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in before)


_BERT_TINY = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)
_BART_TINY = dict(
    vocab_size=64,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=32,
    dropout=0.1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)


def _gradients(model, inputs, seed=1):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs, use_cache=False)
    (out.logits.square().mean() + cd.regularization(model)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_with_the_routed_sites(reentrant):
    # BART's residual F.dropout calls are in the checkpointed layer's own forward: the recomputation in backward
    # must route them to the same sites (with the same noise), or the gradients are those of another graph.
    config = transformers.BartConfig(**_BART_TINY, attention_dropout=0.1, activation_dropout=0.1)
    torch.manual_seed(0)
    model = cd.convert(transformers.BartForConditionalGeneration(config), dataset_size=100)
    assert any(r.kind == "functional" for r in cd.report(model).rows)
    ids = torch.randint(3, 64, (2, 6))
    inputs = {"input_ids": ids, "decoder_input_ids": ids}
    plain = _gradients(model, inputs)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    recomputed = _gradients(checkpointed, inputs)
    assert recomputed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_routed_method_keeps_its_signature():
    # transformers' apply_chunking_to_forward counts the parameters of the function it chunks (XLM's ff_chunk,
    # whose F.dropout call is routed): the interceptor standing in for it must show the method's own signature.
    config = transformers.XLMConfig(
        vocab_size=64, emb_dim=16, n_layers=1, n_heads=2, dropout=0.1, attention_dropout=0.1
    )
    torch.manual_seed(0)
    model = cd.convert(transformers.XLMForSequenceClassification(config), dataset_size=100)
    ffn = model.transformer.ffns[0]
    assert "ff_chunk" in ffn.__dict__  # routed on the instance
    assert list(inspect.signature(ffn.ff_chunk).parameters) == ["input"]
    ids = torch.randint(3, 64, (2, 6))
    model.train()(input_ids=ids).logits.sum().backward()
    assert ffn.ff_chunk_dropout.p_logit.grad is not None
    model.eval()
    model(input_ids=ids)


def test_dropout_only_the_eager_path_applies_gets_eager_attention_while_active():
    # Falcon's ALiBi attention passes attention_dropout.p into SDPA with the configured implementation and calls
    # the module only on its eager path: the site must select that path in training (not hand SDPA a tensor).
    config = transformers.FalconConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        alibi=True,
        hidden_dropout=0.1,
        attention_dropout=0.15,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    original = transformers.FalconForCausalLM(config)
    model = cd.convert(original, dataset_size=100)
    row = {r.name: r for r in cd.report(model).rows}["transformer.h.0.self_attention.attention_dropout"]
    assert (row.kind, row.status) == ("attention", "converted")
    ids = torch.randint(3, 64, (2, 6))
    model.train()
    assert fixed_rate_dropout_calls(model, {"input_ids": ids, "use_cache": False}) == []
    model(input_ids=ids, use_cache=False).logits.square().mean().backward()
    assert model.transformer.h[0].self_attention.attention_dropout.p_logit.grad != 0
    assert config._attn_implementation == "sdpa"  # restored after the forward
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_attention_dropout_inside_torchs_attention_function_becomes_a_site():
    # WavLM passes its attention dropout into F.multi_head_attention_forward (no nn.MultiheadAttention module):
    # the call is routed and torch's function runs with its dropout applied by the site.
    config = transformers.WavLMConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_buckets=16,
        max_bucket_distance=32,
        layerdrop=0.0,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        hidden_dropout=0.1,
        activation_dropout=0.05,
        attention_dropout=0.15,
        feat_proj_dropout=0.1,
        final_dropout=0.2,
    )
    torch.manual_seed(0)
    original = transformers.WavLMForCTC(config)
    model = cd.convert(copy.deepcopy(original), dataset_size=100)
    rows = {r.name: r for r in cd.report(model).rows}
    assert not [r for r in rows.values() if r.status == "unsupported"]
    row = rows["wavlm.encoder.layers.0.attention.torch_multi_head_self_attention_attn_dropout"]
    assert (row.kind, row.status, row.original_p) == ("fused", "converted", pytest.approx(0.15))
    audio = torch.randn(2, 400)
    model.train()
    assert fixed_rate_dropout_calls(model, {"input_values": audio}) == []
    model(audio).logits.square().mean().backward()
    site = model.get_submodule(row.name)
    assert site.p_logit.grad is not None and site.p_logit.grad != 0
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(model(audio).logits, original(audio).logits)
    with torch.no_grad():
        site.p_logit.fill_(math.log(0.25 / 0.75))
    assert cd.freeze(model).wavlm.encoder.layers[0].attention.dropout == pytest.approx(0.25)


def _vision_encoder_decoder():
    encoder = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.1,
    )
    decoder = transformers.GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        add_cross_attention=True,
        resid_pdrop=0.1,
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    return transformers.VisionEncoderDecoderModel(config)


_BUILT_INPUTS = {
    "multiple choice": lambda: transformers.BertForMultipleChoice(transformers.BertConfig(**_BERT_TINY)),
    "encoder-decoder classifier": lambda: transformers.BartForSequenceClassification(
        transformers.BartConfig(**_BART_TINY, num_labels=3)
    ),
    "vision encoder-decoder": _vision_encoder_decoder,
    "text and image, one config": lambda: transformers.ViltForQuestionAnswering(
        transformers.ViltConfig(**_BERT_TINY, image_size=16, patch_size=8, num_labels=3)
    ),
    "speech2text features": lambda: transformers.Speech2TextForConditionalGeneration(
        transformers.Speech2TextConfig(
            **{k: v for k, v in _BART_TINY.items() if k != "max_position_embeddings"},
            max_source_positions=64,
            max_target_positions=64,
            input_feat_per_channel=8,
            conv_channels=16,
            num_conv_layers=2,
            conv_kernel_sizes=(5, 5),
        )
    ),
    "wav2vec2-bert features": lambda: transformers.Wav2Vec2BertForCTC(
        transformers.Wav2Vec2BertConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            feature_projection_input_dim=8,
            conv_depthwise_kernel_size=3,
            hidden_dropout=0.1,
            layerdrop=0.0,
            apply_spec_augment=False,
            mask_time_prob=0.0,
            position_embeddings_type="relative_key",
            left_max_position_embeddings=8,
            right_max_position_embeddings=8,
        )
    ),
    "reformer axial positions": lambda: transformers.ReformerModelWithLMHead(
        transformers.ReformerConfig(
            vocab_size=64,
            hidden_size=16,
            attention_head_size=8,
            num_attention_heads=2,
            attn_layers=["local"],
            axial_pos_shape=[4, 4],
            axial_pos_embds_dim=[8, 8],
            feed_forward_size=32,
            local_attn_chunk_length=4,
            max_position_embeddings=16,
            is_decoder=True,
            pad_token_id=0,
            eos_token_id=2,
            hidden_dropout_prob=0.1,
        )
    ),
}


@pytest.mark.parametrize("case", list(_BUILT_INPUTS))
def test_dry_run_inputs_are_built_for_more_input_layouts(case):
    torch.manual_seed(0)
    original = _BUILT_INPUTS[case]()
    model = cd.convert(original, dataset_size=100)  # no example_inputs: built from the config
    assert [r for r in cd.report(model).rows if r.status == "converted"], cd.report(model)
    inputs = cd.integrations.transformers.example_inputs_for(model)
    model.train()
    assert fixed_rate_dropout_calls(model, inputs) == []
    model.eval()
    original.eval()
    with torch.no_grad():  # the same seed for both: ViLT samples its image patches in eval too
        torch.manual_seed(1)
        converted_output = _first_output(model(**inputs))
        torch.manual_seed(1)
        assert torch.equal(converted_output, _first_output(original(**inputs)))


_BRANCH_INPUTS = {
    "decoder with cross-attention": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=64,
                n_embd=16,
                n_layer=1,
                n_head=2,
                n_positions=32,
                add_cross_attention=True,
                attn_pdrop=0.1,
            )
        ),
        lambda: {"input_ids": torch.randint(3, 64, (2, 6)), "encoder_hidden_states": torch.randn(2, 5, 16)},
    ),
    "image size as input_size": (
        lambda: transformers.LayoutLMv3ForSequenceClassification(
            transformers.LayoutLMv3Config(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=64,
                hidden_dropout_prob=0.1,
                coordinate_size=4,
                shape_size=8,
                input_size=32,
                patch_size=8,
                rel_pos_bins=8,
                max_rel_pos=16,
                rel_2d_pos_bins=8,
                max_rel_2d_pos=32,
            )
        ),
        lambda: {"input_ids": torch.randint(3, 64, (2, 6)), "pixel_values": torch.randn(2, 3, 32, 32)},
    ),
}


@pytest.mark.parametrize("case", list(_BRANCH_INPUTS))
def test_dry_run_inputs_reach_the_branches_real_inputs_take(case):
    # Built inputs that leave out encoder states or pixels convert, but the cross-attention's or the image
    # patches' dropout never runs in the dry run and keeps its fixed rate when real inputs reach it.
    build, real_inputs = _BRANCH_INPUTS[case]
    torch.manual_seed(0)
    model = cd.convert(build(), dataset_size=100)
    assert fixed_rate_dropout_calls(model.train(), real_inputs()) == []


@pytest.mark.parametrize("family", ["llava", "paligemma", "idefics2"])
def test_vision_language_models_get_one_image_token_per_image_feature(family):
    # These models refuse input_ids whose image tokens do not match the image features; the built inputs count
    # the features from the model itself. Families of the coverage benchmark, with every rate nonzero.
    from benchmarks import transformers_families as families

    original, _ = families.build(next(f for f in families.FAMILIES if f.name == family))
    model = cd.convert(original, dataset_size=100)  # no example_inputs
    inputs = cd.integrations.transformers.example_inputs_for(model)
    image_token = model.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum() > 0
    assert fixed_rate_dropout_calls(model.train(), inputs) == []
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(_first_output(model(**inputs)), _first_output(original(**inputs)))


@pytest.mark.parametrize("layout", ["per image", "stacked", "flat"])
def test_image_token_count_from_each_layout_of_image_features(layout):
    # get_image_features gives a list of (tokens, dim) tensors, an (images, tokens, dim) tensor, or (Idefics2 in
    # transformers 4.x) every image's features in one (images * tokens, dim) tensor: 3 tokens per image each way.
    from cd_convert.integrations.transformers_inputs import _with_image_tokens

    class VisionLanguage(nn.Module):
        config = types.SimpleNamespace(image_token_id=7)

        def get_image_features(self, pixel_values):
            images = pixel_values.shape[0] * (pixel_values.shape[1] if pixel_values.dim() == 5 else 1)
            feats = torch.zeros(images, 3, 4)
            return {"per image": list(feats), "stacked": feats, "flat": feats.reshape(images * 3, 4)}[layout]

    inputs = {"input_ids": torch.ones(2, 5, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 8, 8)}
    built = _with_image_tokens(VisionLanguage(), inputs)
    assert built["input_ids"].shape == (2, 8)
    assert (built["input_ids"] == 7).sum(dim=1).tolist() == [3, 3]


@pytest.mark.parametrize("family", ["ast", "siglip2", "clap", "kosmos-2"])
def test_inputs_built_for_spectrograms_patches_audio_and_image_places(family):
    # AST reads a (batch, time, mel) spectrogram as input_values; SigLIP2 flattened patches with their mask and
    # grid; CLAP a text and an audio tower; Kosmos-2 marks where the image's latent queries go. Each converts
    # with no example_inputs, and a training forward on the coverage benchmark's own inputs for the family
    # (written apart from the library's builder) applies no fixed-rate dropout: every branch was reached.
    from benchmarks import transformers_families as families

    spec = next(f for f in families.FAMILIES if f.name == family)
    original, _ = families.build(spec)
    model = cd.convert(original, dataset_size=100)
    assert cd.dropout_rates(model)
    real = families.make_inputs(spec.inputs, original.config)
    # Eval first: a training forward updates the running statistics of CLAP's BatchNorm layers.
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(_first_output(model(**real)), _first_output(original(**real)))
    assert fixed_rate_dropout_calls(model.train(), real) == []
