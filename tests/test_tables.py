"""Tables show numbers people read: whole token rates and counts, seconds to a tenth,
losses to three places, and every loss beside the unigram reference."""

from cached_mslt.training.metrics import below_unigram, markdown_table


def test_table_numbers_are_rounded_by_what_the_column_holds():
    row = {
        "cache build s": 0.04,
        "train s": 381.26,
        "tokens/s": 5505.502,
        "tokens": 1799296,
        "val loss": 6.50412,
        "below unigram %": 6.96,
        "s to baseline loss": 468.836,
        "wall / full": 0.4567,
    }
    line = markdown_table([row], list(row)).splitlines()[-1]
    assert line == "| 0.0 | 381.3 | 5,506 | 1,799,296 | 6.504 | 7.0 | 468.8 | 0.46 |"


def test_below_unigram_is_the_share_of_the_unigram_loss_removed():
    assert abs(below_unigram(6.3, 7.0) - 10.0) < 1e-9
    assert below_unigram(None, 7.0) is None and below_unigram(6.3, None) is None
