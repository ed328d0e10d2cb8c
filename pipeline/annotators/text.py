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
# Distinct sets of hits remembered per annotator (cleared when full; a few MB).
_MEMO_SIZE = 50_000


def normalise_caption(text):
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
        labels_by_term = {}
        for label, terms in self.lexicon.attribute_terms.items():
            for term in terms:
                labels_by_term.setdefault(term, ([], []))[0].append(label)
        for concept, terms in self.lexicon.concept_terms.items():
            for term in terms:
                labels_by_term.setdefault(term, ([], []))[1].append(concept)
        automaton = ahocorasick.Automaton()
        for term, (attributes, concepts) in labels_by_term.items():
            automaton.add_word(f" {term} ", (term, tuple(attributes), tuple(concepts)))
        automaton.make_automaton()
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
        return self._answer(tuple(_longest_hits(self._automaton, text)))

    def label_batch(self, texts):
        """(codes, answers): answers[codes[i]] is labels(texts[i]), each distinct answer listed
        once, so a caller builds per-answer values (Arrow lists, signatures) once, not per caption.
        """
        if self._automaton is None:
            self._automaton = self._build()
        automaton, codes, answers, seen = self._automaton, [], [], {}
        for text in texts:
            hits = tuple(_longest_hits(automaton, text))
            code = seen.get(hits)
            if code is None:
                code = seen[hits] = len(answers)
                answers.append(self._answer(hits))
            codes.append(code)
        return codes, answers

    def _answer(self, hits):
        found = self._memo.get(hits)
        if found is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            found = self._memo[hits] = _labels_of(hits)
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


def _longest_hits(automaton, text):
    """Whole-word hits, leaving out a hit that lies inside a longer one ("dog" in "hot dog")."""
    hits = [(end - len(payload[0]) - 1, end, payload)
            for end, payload in automaton.iter(normalise_caption(text))]
    if len(hits) < 2:
        return [payload for _, _, payload in hits]
    hits.sort(key=lambda hit: hit[0] - hit[1])  # longest first
    kept = []
    for start, end, payload in hits:
        if not any(k_start <= start and end <= k_end for k_start, k_end, _ in kept):
            kept.append((start, end, payload))
    kept.sort(key=lambda hit: hit[0])
    return [payload for _, _, payload in kept]


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
