"""What a bench row claims beside its measurements."""
from leanvit.bench.runner import published_top1
from leanvit.catalog import find_facts


def test_published_top1_only_where_it_describes_the_row():
    facts = find_facts("deit_tiny_patch16_224")
    assert published_top1(facts, facts.img_size, "") == facts.top1
    assert published_top1(facts, 32, "") is None  # the model at another --img-size
    assert published_top1(facts, facts.img_size, "evit:0.7") is None  # a token-reduced variant
    assert published_top1(None, 224, "") is None  # a model the catalog does not know
