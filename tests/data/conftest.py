"""Fixtures for the data pipeline tests (helpers live in datahelpers.py)."""

from __future__ import annotations

import os
import sys

import pytest

# The test modules import datahelpers by name; make this folder importable however pytest is run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datahelpers import build_chat_tokenizer, load_bert_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_chat_tokenizer()


@pytest.fixture(scope="session")
def bert_tokenizer():
    return load_bert_tokenizer()
