"""Fuzzers (atheris) of the library's untrusted-input surfaces, and the hostile inputs they start from."""
