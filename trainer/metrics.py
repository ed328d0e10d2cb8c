"""Model bias and quality metrics on embeddings (DESIGN.md, "Bias of a model"); plain NumPy.

Inputs are L2-normalised embeddings or predicted class indices, so every number can be checked by
hand.
"""
import numpy as np

RECALL_KS = (1, 5, 10)  # the usual image-text retrieval cut-offs (COCO/Flickr30k benchmarks)


def zero_shot_predictions(image_embeddings, class_embeddings) -> np.ndarray:
    """Index of the most similar class prompt for each image (ties go to the first class)."""
    scores = np.asarray(image_embeddings) @ np.asarray(class_embeddings).T
    return scores.argmax(axis=1)


def representation_bias(predicted, values, targets=None) -> dict:
    """RB = max_k |P(pred = k) - pi_k| over zero-shot attribute predictions on an image set.

    predicted: array of value indices; values: the value names; targets: pi_k (uniform by default).
    """
    predicted = np.asarray(predicted)
    if predicted.size == 0:
        raise ValueError("representation bias needs at least one image")
    targets = (
        np.full(len(values), 1.0 / len(values)) if targets is None else np.asarray(targets, float)
    )
    shares = np.bincount(predicted, minlength=len(values))[: len(values)] / predicted.size
    gaps = shares - targets
    return {
        "rb": float(np.abs(gaps).max()),
        "predicted_share": {value: float(share) for value, share in zip(values, shares)},
        "target_share": {value: float(target) for value, target in zip(values, targets)},
        "images": int(predicted.size),
    }


def association_bias(predicted_concepts, attribute, concepts, value_a, value_b) -> dict:
    """AB_r = P(pred = r | k = a) - P(pred = r | k = b) for each concept r, from zero-shot
    predictions.

    predicted_concepts: concept index per image; attribute: the labelled value per image (images of
    other values are ignored). Reports every AB_r, the mean of |AB_r| and the largest |AB_r|.
    """
    predicted_concepts = np.asarray(predicted_concepts)
    attribute = np.asarray(attribute, dtype=object)
    in_a, in_b = attribute == value_a, attribute == value_b
    if not in_a.any() or not in_b.any():
        raise ValueError(f"association bias needs images labelled {value_a!r} and {value_b!r}")
    rate_a = (
        np.bincount(predicted_concepts[in_a], minlength=len(concepts))[: len(concepts)] / in_a.sum()
    )
    rate_b = (
        np.bincount(predicted_concepts[in_b], minlength=len(concepts))[: len(concepts)] / in_b.sum()
    )
    per_concept = rate_a - rate_b
    worst = int(np.abs(per_concept).argmax())
    return {
        "ab_mean_abs": float(np.abs(per_concept).mean()),
        "ab_max_abs": float(np.abs(per_concept).max()),
        "ab_max_concept": concepts[worst],
        "ab_per_concept": {concept: float(value) for concept, value in zip(concepts, per_concept)},
        "value_a": value_a,
        "value_b": value_b,
        "images": {value_a: int(in_a.sum()), value_b: int(in_b.sum())},
    }


def association_bias_along(ab_per_concept: dict, directions: dict):
    """Mean of d_r * AB_r over the concepts with a data direction d_r in {-1, +1}; None if none.

    d_r = +1 where the training data over-represents value a in concept r (share_a|r above a's
    share in all the data), -1 where it under-represents it. Positive: the model reproduces the
    data's association; about 0: whatever dependence it has points nowhere in particular
    (mean |AB_r| still counts that); negative: it is reversed.
    """
    terms = [
        directions[concept] * value
        for concept, value in ab_per_concept.items()
        if directions.get(concept) in (-1, 1)
    ]
    return float(np.mean(terms)) if terms else None


def top1_accuracy(predicted, truth) -> float:
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.size == 0:
        raise ValueError("accuracy needs at least one labelled image")
    return float((predicted == truth).mean())


def retrieval_recall(image_embeddings, text_embeddings, text_image, ks=RECALL_KS) -> dict:
    """Image->text and text->image recall@k.

    text_image[j] is the index of the image that caption j describes (several captions may share an
    image). A query counts as found at k when a correct item ranks in the top k; the rank is the
    number of items that score strictly higher than the best correct one.
    """
    similarity = np.asarray(image_embeddings) @ np.asarray(text_embeddings).T  # [images, texts]
    text_image = np.asarray(text_image)
    num_images = similarity.shape[0]
    correct = text_image[None, :] == np.arange(num_images)[:, None]  # [images, texts]
    if not correct.any(axis=1).all():
        raise ValueError("every image needs at least one caption for image->text retrieval")
    best_correct_text = np.where(correct, similarity, -np.inf).max(axis=1)
    image_rank = (similarity > best_correct_text[:, None]).sum(axis=1)
    correct_image_score = similarity[text_image, np.arange(similarity.shape[1])]
    text_rank = (similarity > correct_image_score[None, :]).sum(axis=0)
    result = {"images": int(num_images), "texts": int(similarity.shape[1])}
    for k in ks:
        result[f"image_to_text_recall@{k}"] = float((image_rank < k).mean())
        result[f"text_to_image_recall@{k}"] = float((text_rank < k).mean())
    return result
