"""Near duplicates are found at the documented threshold (Jaccard of 3-word shingles) and not
below it; `lorafleet data dedup` keeps the first of each group and says what it dropped and why."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image, ImageDraw

from lorafleet.data.dedup import DuplicateIndex, dedup_file, hash_image, jaccard, shingles
from lorafleet.data.records import read_records
from lorafleet.errors import DataError

VOCABULARY = [f"word{i}" for i in range(3000)]


def passage(rng: random.Random, words: int = 60) -> str:
    return " ".join(rng.choices(VOCABULARY, k=words))


def edited(text: str, rng: random.Random, changes: int) -> str:
    words = text.split()
    for index in rng.sample(range(len(words)), changes):
        words[index] = "changed" + str(index)
    return " ".join(words)


def test_similarity_is_the_jaccard_of_word_shingles_after_normalisation():
    assert shingles("The  cat, sat ON the mat!") == {"the cat sat", "cat sat on", "sat on the", "on the mat"}
    assert jaccard(shingles("a b c d"), shingles("a b c e")) == pytest.approx(1 / 3)
    assert shingles("Hi there") == {"hi there"}  # fewer than 3 words: one shingle


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_near_duplicates_are_found_at_the_threshold_and_not_below(threshold):
    rng = random.Random(int(threshold * 100))
    index = DuplicateIndex(threshold)
    originals = [passage(rng) for _ in range(300)]
    for text in originals:
        index.add(text, [])
    above = below = 0
    for number in range(200):
        original = rng.randrange(len(originals))
        variant = edited(originals[original], rng, rng.randint(1, 12))
        similarity = jaccard(shingles(variant), shingles(originals[original]))
        match = index.find(variant, [])
        if similarity >= threshold:
            above += 1
            assert match is not None and match.of == original, (number, similarity)
            assert match.kind == "near" and match.similarity == pytest.approx(similarity)
        else:
            below += 1
            assert match is None, (number, similarity)
    assert above >= 10 and below >= 10  # both sides of the threshold were exercised


def test_an_exact_duplicate_differs_only_in_case_spacing_and_punctuation():
    index = DuplicateIndex()
    index.add("user: Where is the invoice?\nassistant: In the shared folder.", [])
    match = index.find("user: where is the INVOICE\nassistant:   in the shared folder", [])
    assert match is not None and match.kind == "exact" and match.of == 0


def picture(colour: str, box=(8, 8, 40, 40), size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


def test_same_text_with_different_pictures_is_not_a_duplicate():
    index = DuplicateIndex()
    text = "user: What colour is the shape?\nassistant: red"
    index.add(text, [hash_image(picture("red"))])
    assert index.find(text, [hash_image(picture("red"))]).kind == "exact"
    resized = picture("red").resize((128, 128)).resize((64, 64))
    assert index.find(text, [hash_image(resized)]).kind == "near"  # the same picture, re-encoded
    assert index.find(text, [hash_image(picture("blue"))]) is None  # dHash alone cannot see colour
    assert index.find(text, [hash_image(picture("red", box=(24, 24, 56, 56)))]) is None  # elsewhere
    assert index.find(text, []) is None


def write_lines(path, texts):
    records = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]} for t in texts]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_dedup_keeps_the_first_and_reports_which_record_each_dropped_one_repeats(tmp_path):
    rng = random.Random(0)
    first, second = passage(rng), passage(rng)
    near = edited(first, rng, 1)
    texts = [first, second, first.upper(), near, edited(second, rng, 20)]
    source = write_lines(tmp_path / "in.jsonl", texts)
    kept, dropped = dedup_file(source, tmp_path / "out.jsonl", threshold=0.8)
    assert kept == 3
    assert [(d.source.rsplit(":", 1)[1], d.duplicate_of.rsplit(":", 1)[1], d.kind) for d in dropped] == [
        ("3", "1", "exact"),
        ("4", "1", "near"),
    ]
    as_record = [shingles(f"user: {text}\nassistant: ok") for text in (near, first)]  # all turns count
    assert dropped[1].similarity == pytest.approx(jaccard(*as_record))
    records, _ = read_records(tmp_path / "out.jsonl")
    assert [r.messages[0].text for r in records] == [texts[0], texts[1], texts[4]]


def test_dedup_refuses_bad_thresholds_and_never_overwrites_its_input(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", ["a b c"])
    with pytest.raises(DataError, match="threshold must be in"):
        dedup_file(source, tmp_path / "out.jsonl", threshold=1.5)
    with pytest.raises(DataError, match="never overwrites its input"):
        dedup_file(source, source)


def test_dedup_into_another_directory_keeps_image_paths_working(tmp_path):
    from tests.conftest import write_image_dataset

    source = write_image_dataset(tmp_path / "in.jsonl", 8, seed=3)
    lines = source.read_text().splitlines()
    source.write_text("\n".join(lines + lines[:2]) + "\n")  # two repeats
    out = tmp_path / "clean" / "deduplicated.jsonl"
    kept, dropped = dedup_file(source, out)
    assert kept <= 8 and [d.kind for d in dropped][-2:] == ["exact", "exact"]
    records, _ = read_records(out)
    assert all(len(record.load_images()) == 1 for record in records)  # paths now lead from clean/
    assert json.loads(out.read_text().splitlines()[0])["image"].startswith("../in-images/")
