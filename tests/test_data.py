"""data: the fixed split, sentence extraction and windows."""
import torch

from jacquant.app import data


def test_split_every_tenth_document_validates():
    docs = [f"doc {i}" for i in range(25)]
    train, valid = data.split(docs)
    assert valid == ["doc 9", "doc 19"]
    assert len(train) == 23 and not set(train) & set(valid)


def test_sentences_keep_prose_and_drop_markup_and_code():
    doc = ("This module provides a portable way of using operating system features.\n\n"
           ".. function:: getcwd()\n\n   Return a string representing the current working directory.\n\n"
           "    >>> os.getcwd()\n\n"
           "Short one. The following functions create and manage processes in a portable way.")
    got = data.sentences([doc])
    assert got == ["This module provides a portable way of using operating system features.",
                   "Return a string representing the current working directory.",  # indented prose is kept
                   "The following functions create and manage processes in a portable way."]


def test_windows_are_slices_of_the_text():
    text = torch.arange(200, dtype=torch.uint8)
    for b in data.windows(text, batch=3, seq=10, steps=2, seed=0):
        assert b.shape == (3, 11) and b.dtype == torch.long
        assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 11)) for row in b)


def test_corpus_bytes_round_trip():
    c = data.Corpus("t", ["héllo", "world"], ["valid"])
    assert bytes(c.train_bytes.tolist()).decode("utf-8") == "héllo\n\nworld"
