"""Lexicon files: perceived-attribute terms, occupations and the concept vocabulary.

Parses the documented text format of `pipeline/lexicons/` (see its README.md) into plain dicts.
"""
import dataclasses
import pathlib
import re

from pipeline.signatures import split_label
from trainer import english

# The lexicons shipped in the package; users pass their own directory or files instead.
DEFAULT_LEXICON_DIR = pathlib.Path(__file__).resolve().parents[1] / "lexicons"
DEFAULT_LEXICON_FILES = ("perceived_gender.txt", "occupations.txt", "concepts.txt")

KIND_ATTRIBUTE = "attribute"
KIND_CONCEPT = "concept"


class LexiconError(ValueError):
    """A lexicon file does not follow the format in pipeline/lexicons/README.md."""


def plural_of(term):
    """English plural of a term (trainer.english, by inflect): "postman" -> "postmen"."""
    return english.plural(term)


def normalise_term(term):
    """Lower case, words separated by one space: the form both terms and captions are matched in."""
    return " ".join(re.findall(r"\w+", term.lower()))


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """Terms per label. Attribute labels read "group:value"; concept labels are concept names."""
    attribute_terms: dict  # "perceived_gender:man" -> tuple of normalised terms
    concept_terms: dict    # "kitchen" -> tuple of normalised terms
    sources: tuple = ()    # the files it was read from, for logs and evidence

    @property
    def groups(self):
        """Attribute group -> its values, in file order."""
        groups = {}
        for label in self.attribute_terms:
            group, value = split_label(label)
            groups.setdefault(group, []).append(value)
        return {group: tuple(values) for group, values in groups.items()}

    @property
    def concepts(self):
        return tuple(self.concept_terms)

    @classmethod
    def load(cls, paths=None):
        """Reads lexicon files; `paths` may name files or directories (all *.txt inside)."""
        if paths is None:
            paths = [DEFAULT_LEXICON_DIR / name for name in DEFAULT_LEXICON_FILES]
        files = []
        for path in map(pathlib.Path, [paths] if isinstance(paths, (str, pathlib.Path)) else paths):
            if path.is_dir():
                files.extend(sorted(path.glob("*.txt")))
            elif path.is_file():
                files.append(path)
            else:
                raise LexiconError(f"lexicon path {path} does not exist")
        if not files:
            raise LexiconError(f"no lexicon files found in {paths}")
        attribute_terms, concept_terms = {}, {}
        for file in files:
            kind, entries = parse_lexicon_file(file)
            target = attribute_terms if kind == KIND_ATTRIBUTE else concept_terms
            for label, terms in entries.items():
                merged = list(target.get(label, ()))
                merged.extend(term for term in terms if term not in merged)
                target[label] = tuple(merged)
        return cls(attribute_terms, concept_terms, tuple(str(f) for f in files))


def parse_lexicon_file(path):
    """Returns (kind, {label: terms}) for one file; raises LexiconError with the line on mistakes.
    """
    path = pathlib.Path(path)
    directives = {"kind": None, "group": path.stem, "plurals": "none"}
    logical_lines = []  # (line number, text); indented lines continue the previous entry
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line.startswith("@"):
            name, _, value = line[1:].partition(" ")
            if name not in directives:
                raise LexiconError(f"{path}:{number}: unknown directive @{name}")
            directives[name] = value.strip()
        elif raw[:1].isspace() and logical_lines:
            logical_lines[-1] = (logical_lines[-1][0], logical_lines[-1][1] + " " + line.strip())
        else:
            logical_lines.append((number, line.strip()))
    kind = directives["kind"]
    if kind not in (KIND_ATTRIBUTE, KIND_CONCEPT):
        raise LexiconError(f"{path}: needs `@kind attribute` or `@kind concept`, got {kind!r}")
    if directives["plurals"] not in ("auto", "none"):
        raise LexiconError(f"{path}: @plurals must be auto or none")
    explicit = {}
    for number, text in logical_lines:
        name, colon, rest = text.partition(":")
        name = name.strip()
        terms = [normalise_term(t) for t in (rest.split(",") if colon else [name])]
        terms = [t for t in terms if t]
        if not name or not terms:
            raise LexiconError(f"{path}:{number}: expected `name: term, term, ...`")
        label = f"{directives['group']}:{normalise_term(name)}" if kind == KIND_ATTRIBUTE else name
        explicit.setdefault(label, []).extend(t for t in terms if t not in explicit.get(label, []))
    if directives["plurals"] == "auto":
        # A generated plural never overrides a term listed explicitly elsewhere ("glasses").
        listed = {term for terms in explicit.values() for term in terms}
        for terms in explicit.values():
            terms.extend(p for p in map(plural_of, list(terms))
                         if p not in listed and p not in terms)
    return kind, {label: tuple(terms) for label, terms in explicit.items()}
