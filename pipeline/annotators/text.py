"""Text lexicon annotator: perceived attributes and concepts a caption mentions.

One Aho-Corasick automaton (pyahocorasick) over every term, matched on whole words in one pass.
"""
import json
import re

import ahocorasick

from pipeline.annotators.lexicon import Lexicon

# Captions are matched after this normalisation: lower case, every run of non-word characters
# (spaces, punctuation, apostrophes, hyphens) becomes one space, with a space at both ends.
# Terms are stored padded with spaces too, so a hit is always a whole word or word sequence:
# "woman's" -> " woman s " (possessive), "police-officer" -> " police officer ".
_NON_WORD = re.compile(r"[\W_]+")
# The same for ASCII text without a regular expression (a third of the time): lower case, every
# character that is not [a-z0-9] becomes a space, runs of spaces collapse when split.
_ASCII_WORDS = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or 48 <= c <= 57 else 32
                     for c in range(256))
# Between captions labelled together (label_batch): no term contains it, and normalised captions
# cannot (it is not a word character). ASCII captions are normalised together, keeping it.
_SEPARATOR = "\x00"
_ASCII_WORDS_AND_SEPARATOR = b"\x00" + _ASCII_WORDS[1:]
_SPACES = re.compile(b"  +")
# Hits of one caption that label_batch's array pass takes; a caption with more (a long text) goes
# through _longest_of on its own.
_ROW_HITS = 32
# Distinct sets of hits remembered per annotator (cleared when full; a few MB).
_MEMO_SIZE = 50_000


def normalise_caption(text):
    if text.isascii():
        return " " + b" ".join(text.encode("ascii").translate(_ASCII_WORDS).split()).decode(
            "ascii") + " "
    return " " + _NON_WORD.sub(" ", text.lower()).strip() + " "


class TextAnnotator:
    """Callable: caption -> (attributes, concepts, evidence). Picklable; builds its automaton
    lazily.

    attributes: sorted "group:value" labels; concepts: sorted concept names;
    evidence: {"text": {label: [words]}, "concepts": {concept: "text"}} as the caption wrote them.
    """

    def __init__(self, lexicon=None):
        self.lexicon = lexicon if lexicon is not None else Lexicon.load()
        self._automaton = None
        self._memo = {}

    def __getstate__(self):
        return {"lexicon": self.lexicon, "_automaton": None, "_memo": {}}

    def _build(self):
        """The automaton over every term padded with spaces; a hit's value is the term's number in
        self._terms [(term, attributes, concepts)], and self._term_spans[n] is len(term) + 1."""
        import numpy as np

        labels_by_term = {}
        for label, terms in self.lexicon.attribute_terms.items():
            for term in terms:
                labels_by_term.setdefault(term, ([], []))[0].append(label)
        for concept, terms in self.lexicon.concept_terms.items():
            for term in terms:
                labels_by_term.setdefault(term, ([], []))[1].append(concept)
        automaton = ahocorasick.Automaton()
        self._terms = []
        for term, (attributes, concepts) in labels_by_term.items():
            automaton.add_word(f" {term} ", len(self._terms))
            self._terms.append((term, tuple(attributes), tuple(concepts)))
        automaton.make_automaton()
        self._span_list = [len(term) + 1 for term, _, _ in self._terms]  # labels(): per hit
        self._term_spans = np.array(self._span_list, dtype=np.int64)  # label_batch: per batch
        return automaton

    def __call__(self, text):
        """(attributes, concepts, evidence) of one caption; shared with other captions of the same
        hits, so callers read them and do not modify them."""
        return self.labels(text)[:3]

    def labels(self, text):
        """(attributes, concepts, evidence, evidence as JSON) of one caption.

        Captions that hit the same terms get the same answer, so it is built once per set of hits
        (web captions hit a few thousand distinct sets, mostly none or one term) and kept in a
        bounded memo keyed by the hits, never by the caption.
        """
        if self._automaton is None:
            self._automaton = self._build()
        spans = self._span_list
        return self._answer(tuple(_longest_of([
            (end - spans[term], end, term)
            for end, term in self._automaton.iter(normalise_caption(text))])))

    def label_batch(self, texts):
        """(codes, answers): answers[codes[i]] is labels(texts[i]), each distinct answer listed
        once, so a caller builds per-answer values (Arrow lists, signatures) once, not per caption.

        The whole batch is matched at once (_batch_hits) and the hits inside longer ones dropped
        with array operations (_longest_of's rule); Python then runs once per caption with hits,
        only to look its terms up. A caption with more than _ROW_HITS hits (a long text) goes
        through _longest_of alone.
        """
        import numpy as np

        if self._automaton is None:
            self._automaton = self._build()
        codes = [0] * len(texts)
        seen, answers = {(): 0}, [self._answer(())]

        def code_of(hits):
            code = seen.get(hits)
            if code is None:
                code = seen[hits] = len(answers)
                answers.append(self._answer(hits))
            return code

        owners, ends, terms = self._batch_hits(texts)
        if not len(terms):
            return codes, answers
        firsts = ends - self._term_spans[terms]
        starts_run = np.concatenate(([True], owners[1:] != owners[:-1]))
        run_starts = np.flatnonzero(starts_run)
        run_lengths = np.diff(np.append(run_starts, len(terms)))
        long_runs = run_lengths > _ROW_HITS
        for run in np.flatnonzero(long_runs).tolist():
            first, last = run_starts[run], run_starts[run] + run_lengths[run]
            codes[int(owners[first])] = code_of(tuple(_longest_of(list(zip(
                firsts[first:last].tolist(), ends[first:last].tolist(),
                terms[first:last].tolist())))))
        if long_runs.any():
            short = ~long_runs[np.cumsum(starts_run) - 1]
            owners, ends, terms, firsts = owners[short], ends[short], terms[short], firsts[short]
            run_lengths = run_lengths[~long_runs]
        if not len(terms):
            return codes, answers
        # A hit is dropped when another hit of its caption spans it (two hits never span the
        # same text); such a hit is fewer than the caption's hit count away in this order, so
        # hits `apart` places apart are compared in the captions with more hits than that.
        inside = np.zeros(len(terms), dtype=bool)
        hits = np.arange(len(terms))
        hit_counts = np.repeat(run_lengths, run_lengths)
        for apart in range(1, int(run_lengths.max())):
            hits = hits[hit_counts[hits] > apart]  # whole captions: neighbours stay neighbours
            near, far = hits[:-apart], hits[apart:]
            same = owners[near] == owners[far]
            inside[near] |= same & (firsts[far] <= firsts[near]) & (ends[near] <= ends[far])
            inside[far] |= same & (firsts[near] <= firsts[far]) & (ends[far] <= ends[near])
        if inside.any():
            owners, terms = owners[~inside], terms[~inside]
        # each caption's kept hits are in the order they start: none spans another, so the one
        # that ends first starts first
        terms = terms.tolist()
        run_starts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
        bounds = np.append(run_starts, len(terms)).tolist()
        for owner, first, last in zip(owners[run_starts].tolist(), bounds, bounds[1:]):
            hits = tuple(terms[first:last])
            code = seen.get(hits)
            if code is None:
                code = code_of(hits)
            codes[owner] = code
        return codes, answers

    def _batch_hits(self, texts):
        """(owner, end, term) arrays of every hit in `texts`, by owner (the caption's index), each
        caption's hits in the order its own pass (labels) finds them.

        One automaton pass over the normalised captions joined by _SEPARATOR, which no term can
        span; the ASCII captions are normalised together (a byte table, and one regular expression
        that makes runs of spaces one), the others one by one.
        """
        import numpy as np

        automaton = self._automaton
        ascii_ids, other_ids = [], []
        for i, text in enumerate(texts):
            (ascii_ids if text.isascii() else other_ids).append(i)
        joined = _SEPARATOR.join([texts[i] for i in ascii_ids])
        if joined.count(_SEPARATOR) > max(len(ascii_ids) - 1, 0):  # a caption holds one
            ascii_ids, other_ids, joined = [], list(range(len(texts))), ""
        groups = []
        if ascii_ids:
            words = _SPACES.sub(b" ", joined.encode("ascii").translate(_ASCII_WORDS_AND_SEPARATOR))
            # " \x00 " between captions, a space at both ends: each caption padded as normalised
            words = b" " + words.replace(b"\x00", b" \x00 ") + b" "
            separators = np.flatnonzero(np.frombuffer(words, dtype=np.uint8) == 0)
            found = self._found(automaton, words.decode("ascii"))
            groups.append((np.asarray(ascii_ids, dtype=np.int64)[
                np.searchsorted(separators, found[:, 0])], found))
        if other_ids:
            normalised = [normalise_caption(texts[i]) for i in other_ids]
            spans = np.fromiter(map(len, normalised), dtype=np.int64, count=len(normalised)) + 1
            found = self._found(automaton, _SEPARATOR.join(normalised))
            groups.append((np.asarray(other_ids, dtype=np.int64)[
                np.searchsorted(np.cumsum(spans) - spans, found[:, 0], side="right") - 1], found))
        if not groups:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        owners = np.concatenate([owner for owner, _ in groups])
        found = np.concatenate([found for _, found in groups])
        if len(groups) > 1:
            order = np.argsort(owners, kind="stable")
            owners, found = owners[order], found[order]
        return owners, found[:, 0], found[:, 1]

    @staticmethod
    def _found(automaton, text):
        """[(end, term)] of every hit in `text`, as an (n, 2) array."""
        import itertools

        import numpy as np

        return np.fromiter(itertools.chain.from_iterable(automaton.iter(text)),
                           dtype=np.int64).reshape(-1, 2)

    def _answer(self, hits):
        """The answer for a tuple of term numbers."""
        found = self._memo.get(hits)
        if found is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            terms = self._terms
            found = self._memo[hits] = _labels_of([terms[term] for term in hits])
        return found


def _labels_of(hits):
    attribute_words, concepts = {}, {}
    for term, attributes, term_concepts in hits:
        for label in attributes:
            words = attribute_words.setdefault(label, [])
            if term not in words:
                words.append(term)
        for concept in term_concepts:
            concepts[concept] = "text"
    evidence = {}
    if attribute_words:
        evidence["text"] = {label: attribute_words[label] for label in sorted(attribute_words)}
    if concepts:
        evidence["concepts"] = {concept: "text" for concept in sorted(concepts)}
    return (sorted(attribute_words), sorted(concepts), evidence,
            json.dumps(evidence, sort_keys=True, ensure_ascii=False))


def _longest_of(hits):
    """[(start, end, term)] of one caption, in the automaton's order -> the terms of those not
    inside a longer hit ("dog" in "hot dog"), by where they start."""
    if len(hits) < 2:
        return [term for _, _, term in hits]
    hits.sort(key=lambda hit: hit[0] - hit[1])  # longest first
    kept = []
    for start, end, term in hits:
        if not any(k_start <= start and end <= k_end for k_start, k_end, _ in kept):
            kept.append((start, end, term))
    kept.sort(key=lambda hit: hit[0])
    return [term for _, _, term in kept]


_DEFAULT_ANNOTATOR = None


def annotate_caption(text, lexicon=None):
    """Pure-Python entry point: (attributes, concepts, evidence) of one caption, no Beam needed.

    The caller's own copies: changing them changes no later answer (the annotator's are shared).
    """
    global _DEFAULT_ANNOTATOR
    if lexicon is None:
        if _DEFAULT_ANNOTATOR is None:
            _DEFAULT_ANNOTATOR = TextAnnotator()
        annotator = _DEFAULT_ANNOTATOR
    elif isinstance(lexicon, TextAnnotator):
        annotator = lexicon
    else:
        annotator = TextAnnotator(lexicon)
    attributes, concepts, _, evidence_json = annotator.labels(text)
    return list(attributes), list(concepts), json.loads(evidence_json)
