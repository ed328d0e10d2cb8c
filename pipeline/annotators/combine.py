"""Combining the text and image annotators' answers, one policy per attribute group.

Policies: union (default), text (text only), image (image only), agreement (both must say it).
"""
from pipeline.signatures import group_of

POLICY_UNION = "union"
POLICY_TEXT = "text"
POLICY_IMAGE = "image"
POLICY_AGREEMENT = "agreement"
POLICIES = (POLICY_UNION, POLICY_TEXT, POLICY_IMAGE, POLICY_AGREEMENT)
# Concepts are combined like one more group under this name.
CONCEPTS_GROUP = "concepts"


def combine_sets(text_labels, image_labels, policy):
    text_labels, image_labels = set(text_labels), set(image_labels)
    if policy == POLICY_UNION:
        return text_labels | image_labels
    if policy == POLICY_TEXT:
        return text_labels
    if policy == POLICY_IMAGE:
        return image_labels
    if policy == POLICY_AGREEMENT:
        return text_labels & image_labels
    raise ValueError(f"combination policy must be one of {POLICIES}, got {policy!r}")


def parse_policies(default_policy=POLICY_UNION, overrides=()):
    """{"*": default, group: policy} from "group=policy" strings (e.g. "concepts=text")."""
    policies = {"*": default_policy}
    for override in overrides:
        group, equals, policy = override.partition("=")
        if not equals or policy not in POLICIES:
            raise ValueError(f"expected GROUP=POLICY with POLICY in {POLICIES}, got {override!r}")
        policies[group.strip()] = policy
    if default_policy not in POLICIES:
        raise ValueError(f"combination policy must be one of {POLICIES}, got {default_policy!r}")
    return policies


def combine_annotations(text_attributes, text_concepts, image_attributes, image_concepts, policies):
    """(attributes, concepts, concept_sources) after applying each group's policy.

    concept_sources says for every kept concept who found it: "text", "image" or "text+image".
    """
    groups = {group_of(label) for label in [*text_attributes, *image_attributes]}
    attributes = set()
    for group in groups:
        policy = policies.get(group, policies["*"])
        attributes |= combine_sets([a for a in text_attributes if group_of(a) == group],
                                   [a for a in image_attributes if group_of(a) == group], policy)
    concepts = combine_sets(text_concepts, image_concepts,
                            policies.get(CONCEPTS_GROUP, policies["*"]))
    text_concepts, image_concepts = set(text_concepts), set(image_concepts)
    sources = {}
    for concept in sorted(concepts):
        found_by = [name for name, found in (("text", text_concepts), ("image", image_concepts))
                    if concept in found]
        sources[concept] = "+".join(found_by)
    return sorted(attributes), sorted(concepts), sources
