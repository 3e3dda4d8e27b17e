"""The Feast repository shipped with llmfeat as package data (Feast itself loads the files by path)."""
