"""The shipped default model (edgemoe/data/default-moe.gguf, trained by tools/train_default_model.py).

Our engine and transformers (running gguf-py's dequantisation of the same file, Q/K de-permuted by
transformers' own GGUF loader code) must pick the same 32 greedy tokens, and a 200-token sample must be
printable text made mostly of common words of the training text, and not only of a few short ones
(WORDS: the 800 most frequent words of the Shakespeare training split, lower-cased; they cover 75 % of
the held-out words).
"""

from __future__ import annotations

import re

import gguf
import pytest
from reference_runs import dequantised_reference, engine_greedy, hf_greedy
from transformers import MixtralConfig, MixtralForCausalLM

from edgemoe.default_model import default_model_path, shipped_model_path
from edgemoe.engine.core import generate
from edgemoe.loader import load_model
from edgemoe.sampling import SamplingParams
from edgemoe.tokenizer import load_tokenizer

WORDS = set("""
a about above achilles act after again against age ah air alas all almost alone already also am among an and
angelo anne another answer antipholus antonio antony any appear are arm arms art as aside ask at attendants
away ay back bad bardolph base bastard be bear beatrice beauty because become bed been before begin behold
being believe benedick berowne beseech best better between bid black blood bloody body bold bolingbroke book
born both bound boy brave break breath bright bring brother brought brutus buckingham business but by caesar
call came can cannot canst captain cardinal care cassio cassius cast cause certain change charge child citizen
city clarence claudio cleopatra close clown cold come comes comfort coming command common comp company confess
content coriolanus could counsel country course court cousin cressida crown cry cut d dare dark daughter day
days dead dear death deed deeds deep deliver demetrius desdemona desire devil did didst die divine do does dog
don done dost doth doubt down draw dream drink dromio due duke duty e each ear earl ears earth eat edward
either else em end enemy england english enobarbus enough enter ephesus er ere etc even ever every evil exeunt
exit eye eyes face fair faith fall false falstaff far farewell fast father fault favour fear fell fellow fie
field fight fill find fire first fit flesh fly follow fool foot for force ford form forth fortune foul found
four france free french friar friend friends from full further gave general gentle gentleman gentlemen get
give given gives glad glory gloster go god gods goes gold golden gone good grace gracious grave great green
grief ground grow guard ha had half ham hand hands hang happy hard has hast haste hate hath have having he
head hear heard heart hearts heav heaven heavens heavy hector helena hell help hence henry her here high
highness him himself his hither ho hold holy home honest honour hope horse host hot hour hours house how
husband i iago if ii iii ill in indeed into is isabella it itself iv john jove joy juliet just justice keep
kent kill kind king kings kiss knave knew knight know known knows l labour lady land last late law lay lead
lear learn least leave left leonato less lest let letter lie lies life light like lips little live lives
living ll long look looks lord lords lose loss lost lov love loves low lucius macbeth mad madam made maid
majesty make makes man many margaret mark marry master matter may me mean means meet men menenius mercy merry
messenger met methinks might milton mind mine mistress money moon more morning morrow mortal most mother mouth
mrs much music must my myself n name nature nay ne near need needs neither never new news next night no noble
none nor not note nothing now nurse o oath of off office oft often old on once one only open or orlando
othello other others our out over own page palace pale pandarus pardon paris parolles part pass past patience
peace pedro people perhaps pericles person petruchio pistol pity place plain play please pleasure pluck point
poor portia power praise pray present pride prince princess proteus proud prove pure purpose put queen
question quickly rage rather re read ready reason red remember report rest return revenge rich richard right
ring rome romeo room rosalind round royal run s sad said sake same save saw say says scene sea second see seek
seem seems seen self send sense sent servant serve service set shall shallow shalt shame she shepherd should
show sick side sight silence sin since sing sir sister sit sleep so soft soldier soldiers some something son
song sons soon sorrow soul sound sovereign speak speaks speech speed spirit spirits spoke st stand stands
state stay still stood straight strange strength strong such suffolk sun sure swear sweet sword syracuse t
take talbot talk taste tears tell ten tender th than thank thanks that the thee their them themselves then
thence there therefore these they thine thing things think thir third this those thou though thought thoughts
thousand three through thus thy thyself till time times timon tis titus to toby together told tongue too took
touch troilus true truly trust truth turn twenty two uncle under unless unto up upon us use used vain
valentine valiant very villain virtue voice walk want war warrant warwick was watch water way we wear weep
welcome well were what when whence where wherefore wherein whether which while white who whole whom whose why
wide wife will wilt wind wise wish wit with within without woe woman women wonder word words work world worse
worth worthy would wrong ye yea years yes yet yield york you young your yours yourself youth
""".split())

PROMPT = "ROMEO.\nBut soft, what light"


@pytest.fixture(scope="module")
def path() -> str:
    p = shipped_model_path()
    if p is None:
        pytest.fail("edgemoe/data/default-moe.gguf is missing; run tools/train_default_model.py")
    return p


def hf_config(path: str) -> dict:
    """The MixtralForCausalLM config, read back from the GGUF metadata."""
    r = gguf.GGUFReader(path)

    def get(key: str):
        return r.fields[key].contents()

    return dict(
        vocab_size=len(r.fields["tokenizer.ggml.tokens"].data), hidden_size=get("llama.embedding_length"),
        intermediate_size=get("llama.feed_forward_length"), num_hidden_layers=get("llama.block_count"),
        num_attention_heads=get("llama.attention.head_count"),
        num_key_value_heads=get("llama.attention.head_count_kv"), num_local_experts=get("llama.expert_count"),
        num_experts_per_tok=get("llama.expert_used_count"), rms_norm_eps=get("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=get("llama.rope.freq_base"), max_position_embeddings=get("llama.context_length"),
        tie_word_embeddings=False,
    )


def test_default_model_is_the_shipped_one(path):
    assert default_model_path() == path


def test_greedy_tokens_match_transformers(path):
    cfg = hf_config(path)
    ref = dequantised_reference(MixtralForCausalLM(MixtralConfig(**cfg)), cfg, path)
    ids = load_tokenizer(path).encode(PROMPT)
    assert engine_greedy(path, ids, 32) == hf_greedy(ref, ids, 32)


def test_sample_is_shakespeare_like_text(path):
    loaded = load_model(path)
    tok = loaded.tokenizer
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=7)
    ids = generate(loaded.model, tok.encode(PROMPT), 200, params, eos=False).tokens
    text = tok.decode(ids)
    assert len(ids) == 200
    assert all(c.isprintable() or c in "\n\t" for c in text), repr(text)
    # Whitespace-separated words, punctuation stripped from their ends; fragments like "andI" or "ery" fail.
    words = [w.strip(".,;:!?'\"-()[]").lower() for w in text.split()]
    words = [w for w in words if re.search("[a-z]", w)]
    assert len(words) >= 50, text
    common = sum(w in WORDS for w in words) / len(words)
    assert common >= 0.5, f"only {common:.0%} of the words are common training words:\n{text}"
    # An undertrained model also emits mostly common words, but only a handful of short ones (4 after
    # 4 training steps, 19 for the shipped model).
    distinct = {w for w in words if w in WORDS and len(w) >= 4}
    assert len(distinct) >= 12, f"only {len(distinct)} distinct common words of 4+ letters:\n{text}"


def test_shipped_draft_matches_transformers_and_shares_the_tokenizer(path):
    """The default model's draft (speculative decoding): the same tokenizer, and logits that match
    transformers' on gguf-py's dequantisation of it within int8-activation rounding (about 1 % of the logit
    scale; its greedy tokens can part at near-ties, so every position's argmax is compared only where the
    reference's top two are further apart than the tolerance)."""
    import numpy as np
    from reference_runs import engine_logits, hf_logits

    from edgemoe.default_model import draft_model_path
    from edgemoe.engine.tokenizers import first_difference

    draft = draft_model_path()
    assert first_difference(load_tokenizer(path), load_tokenizer(draft)) is None
    cfg = hf_config(draft)
    ref = dequantised_reference(MixtralForCausalLM(MixtralConfig(**cfg)), cfg, draft)
    ids = load_tokenizer(draft).encode(PROMPT + ", through yonder window breaks?\nIt is the east, and Juliet")
    want, got = hf_logits(ref, ids), engine_logits(draft, ids)  # (T, V)
    tol = 0.03 * np.abs(want).max()
    assert np.abs(want - got).max() <= tol
    top2 = np.sort(want, axis=1)[:, -2:]  # (T, 2)
    clear = top2[:, 1] - top2[:, 0] > 2 * tol
    assert clear.sum() >= len(ids) // 3
    assert (want.argmax(1) == got.argmax(1))[clear].all()
