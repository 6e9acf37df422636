"""safety/reflection.py: real text's fast insertion (a table lookup, what reflect.py's workers run) against the plain
loop beside it, on random documents of random lengths, segments and categories; and reflect.py's reflect stream
against the loop, end to end in a worker."""
import json
import os
import random
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reflect  # noqa: E402
from safety import reflection  # noqa: E402
from safety.realtext import bpe  # noqa: E402
from safety.realtext.corpus import BENCH_WORDS, toy_encoding  # noqa: E402

CATEGORIES = [None, None, "violence", "weapons", "self_harm"]


def random_text(rng):
    """Sentences of random words (some long enough to be cut inside), now and then characters of several bytes."""
    sents = []
    for _ in range(rng.randint(0, 8)):
        words = [rng.choice(BENCH_WORDS) for _ in range(rng.choice([1, 3, 6, 12, 50]))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), "café 中文😀")
        sents.append(" ".join(words).capitalize() + rng.choice(".!?,"))
    return rng.choice([" ", "\n\n"]).join(sents)


def segmented_flat(enc, segmenter, texts):
    """The documents' tokens concatenated, their segment ends, and whether each segment ends its document."""
    ids = [x for x in (enc.encode_ordinary(t) for t in texts) if x]
    flat = np.array([t for x in ids for t in x], dtype=np.int64)
    ends = np.cumsum([len(x) for x in ids])
    seg_ends, _ = segmenter.segment(flat, ends)
    return flat, seg_ends, np.isin(seg_ends, ends)


def test_the_fast_insertion_is_the_loop_on_random_documents():
    enc = toy_encoding()
    eot = enc.n_vocab            # an id no text token has: where a document ends shows
    rng = random.Random(0)
    cache = {}

    def reflection_of(category):
        if category not in cache:
            cache[category] = reflection.text_reflection(enc, category)
        return cache[category]
    for trial in range(40):
        segmenter = reflection.TextSegmenter(enc, rng.choice([1, 4, 16, 32]))
        texts = [random_text(rng) for _ in range(rng.randint(1, 12))]
        flat, seg_ends, last = segmented_flat(enc, segmenter, texts)
        if not len(flat):
            continue
        cats = [rng.choice(CATEGORIES) for _ in seg_ends]
        fast = reflection.insert_text_reflections(flat, seg_ends, cats, last, reflection_of, eot)
        slow = reflection.insert_text_reflections_loop(flat, seg_ends, cats, last, reflection_of, eot)
        assert fast.tolist() == slow.tolist(), trial
        # the loop itself is what it says: each document's tokens with every segment's reflection, then the end
        docs = enc.decode([t for t in slow.tolist() if t != eot])
        assert docs.count("<think>") == len(seg_ends) and int((slow == eot).sum()) == int(last.sum())
    # and the comparison can fail: the fast path without the document ends is not the loop
    assert reflection.insert_text_reflections(flat, seg_ends, cats, np.zeros_like(last), reflection_of,
                                              eot).tolist() != slow.tolist()


def test_reflect_pys_reflect_stream_is_the_loop(tmp_path):
    """reflect.py's worker (process_docs, reflect intervention) on labelled random documents: its mix stream is
    the loop's insertion of the categories the segmenter gives, its safe stream the unlabelled documents alone."""
    spec = str(tmp_path / "toy.json")
    bpe.write_tokenizer(toy_encoding(), spec)
    enc = bpe.real_tokenizer(spec)          # with <|endoftext|> and <|harmful|>, as reflect.py loads a tokenizer
    rng = random.Random(1)
    docs = [(f"d{i}", random_text(rng)) for i in range(30)]
    labels = {}
    for doc_id, text in docs:
        if len(text) > 20 and rng.random() < 0.4:
            s = rng.randrange(len(text) - 10)
            labels[doc_id] = [(s, s + rng.randint(1, 10), rng.choice(CATEGORIES[2:]), 0)]
    eot = enc.eot_token
    reflect.init_worker({"enc": enc, "tables": reflection.token_tables(enc), "eot": eot,
                         "tag": enc._special_tokens["<|harmful|>"], "dtype": np.uint16, "labels": labels,
                         "labels_path": "", "rewrites": {}, "clf": None, "intervention": "reflect",
                         "filter_level": "document", "segment_tokens": 16, "tag_rate": 0.05, "seed": 0})
    safe, mix, stats = reflect.process_docs(docs)
    kept = [(i, t) for i, t in docs if enc.encode_ordinary(t)]
    flat = np.array([x for _, t in kept for x in enc.encode_ordinary(t)], dtype=np.int64)
    lens = np.array([len(enc.encode_ordinary(t)) for _, t in kept])
    ends = np.cumsum(lens)
    spans = [list(labels.get(i, [])) for i, _ in kept]
    seg_ends, cats, _ = reflection.TextSegmenter(enc, 16).segment_docs(kept, spans, flat, ends - lens, ends)
    loop = reflection.insert_text_reflections_loop(flat, seg_ends, cats, np.isin(seg_ends, ends),
                                                   lambda c: reflection.text_reflection(enc, c), eot)
    assert mix.tolist() == loop.tolist()
    assert stats["reflections"] == len(seg_ends) and stats["unsafe_segments"] == sum(c is not None for c in cats) > 0
    unlabelled = [t for i, t in kept if i not in labels]
    assert safe.tolist() == [x for t in unlabelled for x in enc.encode_ordinary(t) + [eot]]
    assert json.dumps(stats["labelled_ids"]) == json.dumps([i for i, _ in docs if i in labels])
