"""π₀.₅'s state in the prompt: the prompt assembled in JAX from precomputed parts (`pi0.state_prompt`) equals openpi's
host path (the whole string "Task: <text>, State: <bins>;\\nAction: " encoded by SentencePiece), for random prompts
and states, with real SentencePiece models trained here by sentencepiece's own trainer (the PaliGemma file cannot be
downloaded; the code path is the one it takes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import robot_sentences, train_sentencepiece

from common import RunError, openpi, pi0

WORDS = "pick up the black bowl between plate and ramekin place it on cookie box open top drawer of cabinet".split()


_SP_DEFAULTS = dict(add_dummy_prefix=True, remove_extra_whitespaces=True, normalization_rule_name="nmt_nfkc")
# Gemma's / PaliGemma's settings (conftest's default: digits split, no dummy prefix, whitespace kept), and two other
# kinds of model with sentencepiece's own defaults
SP_OPTIONS = {
    "bpe_gemma_like": {},
    "unigram_default": dict(_SP_DEFAULTS, model_type="unigram", split_digits=False, allow_whitespace_only_pieces=False),
    "bpe_digits_merge": dict(_SP_DEFAULTS, model_type="bpe", split_digits=False, allow_whitespace_only_pieces=False),
}


def _train(tmp_path, **options) -> str:
    path = tmp_path / f"sp_{len(list(tmp_path.iterdir()))}.model"
    return train_sentencepiece(path, robot_sentences(np.random.default_rng(0)), vocab_size=300, **options)


def _random_case(rng, prompts, S):
    """Prompts and states that hit every kind of value: inside [-1, 1], below -1, above 1, and exact bin edges."""
    state = rng.uniform(-1.3, 1.3, (16, S)).astype(np.float32)
    edges = np.linspace(-1, 1, 257)[:-1]
    state[:4] = rng.choice(edges, (4, S))  # exactly on an edge: the bin that starts there
    return state, rng.integers(0, len(prompts), 16)


def _check(tokenizer, max_len, S, seed):
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS, rng.integers(1, 12))) for _ in range(5)] + ["put_it_on the plate\n"]
    config = pi0.make_config("cpu", pi05=True, max_token_len=max_len, state_dim=S, action_dim=S)
    table = pi0.make_prompt_table(prompts, tokenizer, state_in_prompt=True)
    state, pid = _random_case(rng, prompts, S)
    obs = jax.jit(lambda o: pi0.make_observation(config, o, table))({"state": state, "prompt_id": pid})
    for b in range(len(pid)):
        want, want_mask = tokenizer.tokenize(prompts[pid[b]], state[b])  # openpi's path: the whole string, on host
        np.testing.assert_array_equal(np.asarray(obs.tokens[b]), want, err_msg=f"row {b}")
        np.testing.assert_array_equal(np.asarray(obs.token_mask[b]), want_mask, err_msg=f"row {b}")
    return obs


@pytest.mark.parametrize("kind", sorted(SP_OPTIONS))
def test_sentencepiece_state_prompt_matches_openpi_format(tmp_path, kind):
    path = _train(tmp_path, **SP_OPTIONS[kind])
    tok = openpi.PaligemmaTokenizer(path, 200)
    obs = _check(tok, 200, S=8, seed=1)  # LIBERO's 8 state dims, openpi's π₀.₅ prompt length
    assert obs.token_mask.sum(-1).min() < 200  # nothing truncated: the whole state is there
    short = openpi.PaligemmaTokenizer(path, 24)  # prompts cut in the middle of the state, as openpi truncates
    obs = _check(short, 24, S=8, seed=2)
    assert bool(obs.token_mask.all())
    if kind == "bpe_gemma_like":  # an identity normaliser keeps the text as written: openpi's format, read back
        text = tok.sp.decode(tok.ids("pick up the bowl", np.array([-1.2, 0.0, 0.999], np.float32)))
        assert text == "Task: pick up the bowl, State: -1 128 255;\nAction: "


def test_builtin_tokenizer_state_prompt():
    tok = pi0.BuiltinTokenizer(60, 128)
    obs = _check(tok, 60, S=10, seed=3)  # push's 10 state dims
    assert obs.token_mask.sum(-1).min() < 60
    _check(pi0.BuiltinTokenizer(20, 128), 20, S=10, seed=4)
    # the π₀ format is unchanged by the state variant: BOS, words, newline
    ids = tok.ids("push the block")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5


def test_state_changes_only_the_state_part_and_pi0_ignores_it():
    tok = pi0.BuiltinTokenizer(60, 128)
    c05 = pi0.make_config("cpu", pi05=True, max_token_len=60)
    table05 = pi0.make_prompt_table(["push the block"], tok, state_in_prompt=True)
    table0 = pi0.make_prompt_table(["push the block"], tok)
    s = np.zeros((2, 10), np.float32)
    s[1, 3] = 0.5
    obs = {"state": s, "prompt_id": np.zeros(2, np.int32)}
    o05 = pi0.make_observation(c05, obs, table05)
    assert not np.array_equal(o05.tokens[0], o05.tokens[1])
    np.testing.assert_array_equal(o05.tokens[0, :5], o05.tokens[1, :5])  # BOS, 3 words, newline: the same
    o0 = pi0.make_observation(pi0.make_config("cpu", max_token_len=60), obs, table0)
    np.testing.assert_array_equal(o0.tokens[0], o0.tokens[1])  # π₀: the state goes to its state token instead


def test_discretize_matches_numpy():
    x = np.concatenate([np.linspace(-1.1, 1.1, 2001), np.linspace(-1, 1, 257), [-1.0, 1.0, 0.9921875]]).astype(
        np.float32
    )
    want = np.digitize(x, bins=np.linspace(-1, 1, 257)[:-1]) - 1
    np.testing.assert_array_equal(np.asarray(pi0.discretize_state(jnp.asarray(x))), want)


def test_tokenizer_that_cannot_be_cut_is_refused():
    class Merging(pi0.BuiltinTokenizer):
        def ids(self, prompt, state=None):  # a "tokenizer" whose numbers depend on their neighbours
            out = super().ids(prompt, state)
            return out if state is None else out[:-2] + [out[-1]]

    with pytest.raises(RunError, match="part by part"):
        pi0.make_prompt_table(["push"], Merging(60, 128), state_in_prompt=True)


def test_config_state_in_prompt_follows_pi05():
    assert pi0.make_config("cpu", pi05=True).state_in_prompt
    assert not pi0.make_config("cpu").state_in_prompt
    assert not pi0.make_config("cpu", pi05=True, discrete_state=False).state_in_prompt
    assert pi0.make_config("pi05").state_in_prompt and not pi0.make_config("pi0").state_in_prompt
