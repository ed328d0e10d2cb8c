"""English word forms, by inflect: plurals (lexicon terms) and the article before a word (prompts,
synthetic captions). One place for both, used by the trainer and by the pipeline's lexicon.
"""
import functools


@functools.cache
def _engine():
    """inflect's engine, imported without typeguard's run-time checks.

    inflect wraps its methods in typeguard's @typechecked, which re-parses and recompiles inflect's
    source when it is imported: 1.6 s here, paid by every job that reads a lexicon (typeguard skips
    the same work under `python -O`). The decorator is the identity while inflect is imported; the
    answers are the same, only the checks of argument types are gone.
    """
    import typeguard

    checked = typeguard.typechecked
    typeguard.typechecked = lambda target=None, **_: (
        target if target is not None else (lambda fn: fn)
    )
    try:
        import inflect
    finally:
        typeguard.typechecked = checked
    return inflect.engine()


def plural(term: str) -> str:
    """ "police officer" -> "police officers", "postman" -> "postmen", "businessperson" ->
    "businesspeople", "potato" -> "potatoes", "sheep" -> "sheep"."""
    return _engine().plural_noun(term)


def with_article(phrase: str) -> str:
    """The phrase after the indefinite article English puts before it: "an office", "a kitchen",
    "a uniform", "an hour"."""
    return _engine().a(phrase)
