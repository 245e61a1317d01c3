"""utils.generation on a tiny random llama model: batching, order, sampling, token counts, NaN checks."""
import pytest
import torch

from tests.fixtures.tiny_model import build_tiny_model
from utils.generation import NonFiniteLogitsError, count_tokens, generate
from utils.modeling import load_model, load_tokenizer

# Different lengths, so batches need left padding; the longest is not first, so sorting matters.
QUESTIONS = ["what is 5,829 - 5,735 ?",
             "what was the percentage change in net revenue from 2017 to 2018 , in millions ?",
             "total ?",
             "the table shows revenue of $ 5,829 million in 2018 and $ 5,735 million in 2017 . change ?"]
PROMPTS = [[{"role": "user", "content": question}] for question in QUESTIONS]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_folder):
    model = load_model(str(tiny_folder), dtype="float32", device="cpu")
    # At the default init (std 0.02) greedy decoding just repeats the last prompt token, which
    # would hide padding bugs: wider weights make the continuation depend on the whole prompt.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return model, load_tokenizer(str(tiny_folder))


def _constant_head(model, token_id: int):
    """Replace the output layer with one that always prefers token_id (a scripted model)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


def test_batched_greedy_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, show_progress=False)
    single = [generate(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1, show_progress=False)[0]
              for prompt in PROMPTS]
    assert [r["completions"] for r in batched] == [r["completions"] for r in single]
    assert [r["num_tokens"] for r in batched] == [r["num_tokens"] for r in single]
    assert len({r["completions"][0] for r in batched}) > 1      # the outputs do depend on the prompt


def test_input_order_is_kept(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    forward = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, show_progress=False)
    backward = generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=6, batch_size=2, show_progress=False)
    assert forward == backward[::-1]


def test_num_return_sequences(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sampled = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=3, do_sample=True,
                       temperature=0.8, top_p=0.9, num_return_sequences=3, seed=0, show_progress=False)
    greedy = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=5, num_return_sequences=2,
                      show_progress=False)
    assert len(sampled) == 4
    assert all(len(r["completions"]) == 3 and len(r["num_tokens"]) == 3 for r in sampled)
    assert all(r["completions"][0] == r["completions"][1] for r in greedy)  # greedy: K copies


def test_shared_prompt_cache_samples_as_num_return_sequences(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ours = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, batch_size=2, do_sample=True,
                    temperature=1.0, top_p=1.0, num_return_sequences=3, seed=5, show_progress=False)
    # transformers' own expansion (every copy runs the whole prompt), same batch order (longest
    # first), same seed: the same RNG draws, so the same samples
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in PROMPTS[1::-1]]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    torch.manual_seed(5)
    output = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=3,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    theirs = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours[1]["completions"] + ours[0]["completions"] == theirs


def test_seed_reproducible(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    options = dict(max_new_tokens=8, batch_size=2, do_sample=True, temperature=1.0, top_p=1.0,
                   num_return_sequences=2, show_progress=False)
    first = generate(model, tokenizer, PROMPTS, seed=1, **options)
    torch.manual_seed(123)                                           # earlier RNG use does not matter
    torch.rand(10)
    again = generate(model, tokenizer, PROMPTS, seed=1, **options)
    other = generate(model, tokenizer, PROMPTS, seed=2, **options)
    assert first == again
    assert first != other                                            # 64 sampled tokens: equal only by chance


def test_num_tokens_within_budget(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    results = generate(model, tokenizer, PROMPTS, max_new_tokens=7, batch_size=4, do_sample=True,
                       num_return_sequences=2, seed=0, show_progress=False)
    assert all(1 <= n <= 7 for r in results for n in r["num_tokens"])


def test_num_tokens_stops_at_eos(tiny_folder):
    tokenizer = load_tokenizer(str(tiny_folder))
    model = _constant_head(load_model(str(tiny_folder), dtype="float32", device="cpu"), tokenizer.eos_token_id)
    results = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, show_progress=False)
    assert results == [{"completions": [""], "num_tokens": [1]}] * 4  # EOS counted, not decoded


def test_num_tokens_without_eos_matches_retokenized_length(tiny_folder):
    tokenizer = load_tokenizer(str(tiny_folder))
    seven = tokenizer.encode("7", add_special_tokens=False)[0]
    model = _constant_head(load_model(str(tiny_folder), dtype="float32", device="cpu"), seven)
    results = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, show_progress=False)
    for result in results:
        assert result["completions"] == ["777777"]                    # decoded new tokens only
        assert result["num_tokens"] == [6]                            # budget used, no EOS
        assert count_tokens(tokenizer, result["completions"][0]) == 6


def test_nan_logits_raise_naming_checkpoint(tiny_folder):
    tokenizer = load_tokenizer(str(tiny_folder))
    model = load_model(str(tiny_folder), dtype="float32", device="cpu")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    for do_sample in (False, True):
        with pytest.raises(NonFiniteLogitsError, match="checkpoint outputs/run_x/ckpt/best .*token 0"):
            generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4, do_sample=do_sample, seed=0,
                     checkpoint="outputs/run_x/ckpt/best", show_progress=False)


def test_prompt_longer_than_context_names_the_example(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long_prompt = [{"role": "user", "content": "1 " * model.config.max_position_embeddings}]
    with pytest.raises(ValueError, match="prompt 1 has .* tokens"):
        generate(model, tokenizer, [PROMPTS[0], long_prompt], max_new_tokens=4, show_progress=False)


def test_peft_model_generates_as_its_base(tiny_folder):
    from peft import LoraConfig, get_peft_model
    tokenizer = load_tokenizer(str(tiny_folder))
    options = dict(max_new_tokens=5, batch_size=2, do_sample=True, num_return_sequences=2, seed=3,
                   show_progress=False)
    base = generate(load_model(str(tiny_folder), dtype="float32", device="cpu"), tokenizer, PROMPTS, **options)
    lora = get_peft_model(load_model(str(tiny_folder), dtype="float32", device="cpu"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert generate(lora, tokenizer, PROMPTS, **options) == base   # LoRA's B starts at zero


def test_training_mode_restored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, show_progress=False)
    assert model.training                                            # a trainer's policy stays in train mode
    model.eval()
