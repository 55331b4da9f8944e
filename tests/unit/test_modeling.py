"""Model configs and presets, seeded initialisation, parameter counts, and the saved model directory
(transformers reload; vLLM load under the `vllm` marker)."""

import json

import pytest
import torch
from pydantic import ValidationError

from apr_ray.modeling import (
    MODEL_PRESETS,
    ModelConfig,
    count_parameters,
    get_preset,
    init_model,
    llama_config,
    main,
    save_pretrained,
)
from apr_ray.tokenizer import build_tokenizer

torch.set_num_threads(2)

PROMPT = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _tiny(**changes) -> ModelConfig:
    return ModelConfig.model_validate({**MODEL_PRESETS["tiny"].model_dump(), **changes})


def test_paper_preset_has_the_papers_non_embedding_parameter_count(tok):
    model = init_model(get_preset("paper"), tok, device="meta")
    total, non_embedding = count_parameters(model)
    # 18 x (4 x 1024^2 attention + 3 x 1024 x 2752 MLP + 2 x 1024 norms) + 1024 final norm
    assert non_embedding == 18 * (4 * 1024**2 + 3 * 1024 * 2752 + 2 * 1024) + 1024 == 227_709_952
    assert total == non_embedding + 2 * len(tok) * 1024  # untied embedding and LM head
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 16, 64)
    assert cfg.max_position_embeddings == 4096 and cfg.tie_word_embeddings is False
    assert cfg.rope_parameters["rope_theta"] == 10000.0 and cfg.rms_norm_eps == 1e-6


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 0.5e6, 5e6), ("small", 20e6, 40e6)])
def test_preset_sizes(tok, name, low, high):
    total, _ = count_parameters(init_model(get_preset(name), tok, device="meta"))
    assert low <= total <= high


def test_tied_embedding_counted_once(tok):
    model = init_model(_tiny(tie_word_embeddings=True), tok)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    total, non_embedding = count_parameters(model)
    assert total - non_embedding == len(tok) * model.config.hidden_size
    untied_total, untied_non_embedding = count_parameters(init_model(_tiny(tie_word_embeddings=False), tok))
    assert untied_non_embedding == non_embedding and untied_total == total + len(tok) * model.config.hidden_size


def test_model_config_rejects_bad_shapes_and_unknown_keys():
    with pytest.raises(ValidationError, match="extra"):
        _tiny(hidden=128)
    with pytest.raises(ValidationError, match="not a multiple of num_heads"):
        _tiny(num_heads=5)
    with pytest.raises(ValidationError, match="not a multiple of num_kv_heads"):
        _tiny(num_kv_heads=3)
    with pytest.raises(ValidationError, match="head_dim = hidden_size / num_heads = 16"):
        _tiny(num_heads=8)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_preset("huge")


def test_llama_config_takes_vocab_and_ids_from_the_tokenizer(tok):
    cfg = llama_config(_tiny(num_kv_heads=2, rope_theta=5000.0, dtype="bfloat16"), tok)
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 32
    assert cfg.rope_parameters["rope_theta"] == 5000.0
    assert cfg.dtype == torch.bfloat16


def test_init_is_seeded_and_leaves_the_global_rng_alone(tok):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = init_model(_tiny(seed=7), tok)
    assert torch.equal(torch.rand(3), expected_next)
    b = init_model(_tiny(seed=7), tok)
    c = init_model(_tiny(seed=8), tok)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert init_model(_tiny(dtype="bfloat16"), tok).model.embed_tokens.weight.dtype == torch.bfloat16


def test_init_refuses_other_devices(tok):
    with pytest.raises(ValueError, match="device='cuda'"):
        init_model(_tiny(), tok, device="cuda")


def test_saved_directory_reloads_with_auto_classes(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = init_model(get_preset("tiny"), tok).eval()
    save_pretrained(model, tok, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == (2, 0, 1)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = torch.tensor([[tok.bos_token_id, *reloaded_tok(PROMPT)["input_ids"]]])
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    assert torch.allclose(expected, got, atol=1e-6)
    assert count_parameters(reloaded) == count_parameters(model)


def test_cli_prints_counts_and_writes_a_model_directory(tmp_path, capsys):
    main(["--preset", "tiny", "--out", str(tmp_path / "m"), "--seed", "3"])
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["seed"] == 3 and report["vocab_size"] == len(build_tokenizer())
    assert report["total_params"] > report["non_embedding_params"] > 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    main(["--preset", "paper"])
    assert json.loads(capsys.readouterr().out)["non_embedding_params"] == 227_709_952


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_loads_the_saved_directory_and_matches_transformers_greedy(tok, tmp_path, monkeypatch):
    """The generator actors load exactly this directory: vLLM (CPU) must serve it, decode our tokens, and
    agree with transformers on greedy tokens."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = init_model(get_preset("tiny"), tok).eval()
    save_pretrained(model, tok, tmp_path)
    prompt_ids = [tok.bos_token_id, *tok.encode(PROMPT)]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, min_new_tokens=12)[0, len(prompt_ids):].tolist()

    llm = LLM(model=str(tmp_path), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 * 2**20,
              max_model_len=512, seed=0)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params)[0].outputs[0]
    assert list(out.token_ids) == hf
    assert out.text == tok.decode(hf, skip_special_tokens=True)
    # A text prompt goes through the saved tokenizer: no BOS added, same ids as ours.
    text_out = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert list(text_out.prompt_token_ids) == tok.encode(PROMPT)


def test_fourier_number_embedding_encodes_values_and_leaves_other_tokens_as_the_random_init(tok):
    vocab = tok.get_vocab()
    random_init = init_model(_tiny(), tok).get_input_embeddings().weight.detach()
    fourier = init_model(_tiny(number_embedding="fourier", fourier_dims=64), tok).get_input_embeddings().weight.detach()
    digits = [i for t, i in vocab.items() if t.isdigit()]
    others = [i for t, i in vocab.items() if not t.isdigit()]
    assert len(digits) == 1110
    assert torch.equal(fourier[others], random_init[others])
    assert torch.equal(fourier[digits, 64:], random_init[digits, 64:])  # the rest of a number's row stays random

    def value_part(token: str) -> torch.Tensor:
        return fourier[vocab[token], :64]

    near = torch.cosine_similarity(value_part("12"), value_part("13"), 0)
    far = torch.cosine_similarity(value_part("12"), value_part("500"), 0)
    assert near > 0.6 > 0.3 > far  # periods of 2..1000: the short ones tell 12 from 13, the long ones bind them
    assert torch.allclose(value_part("7"), value_part("007"))  # the value, not the spelling
    assert float(fourier[digits, :64].std()) == pytest.approx(0.02, rel=0.1)  # the random init's scale


def test_fourier_dims_must_fit_the_width():
    with pytest.raises(ValidationError, match="fourier_dims"):
        _tiny(number_embedding="fourier", fourier_dims=130)
    with pytest.raises(ValidationError, match="fourier_dims"):
        _tiny(number_embedding="fourier", fourier_dims=63)
