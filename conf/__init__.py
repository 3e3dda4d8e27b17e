"""Profiles (YAML) shipped with llmfeat as package data; `llmfeat.paths.conf_dir()` finds them."""
