

def pytest_collection_modifyitems(config, items):
    # Integration tests boot guests: run the quick unit tests first.
    items.sort(key=lambda item: "integration" in item.keywords)
