"""Money: integer minor units with an ISO 4217 currency, never a float."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from risk_engine.money import CurrencyConfigError, Money, UnknownCurrencyError, currency_exponent, load_base_currency

values = st.integers(min_value=-(10**15), max_value=10**15)


@given(values, values)
def test_adding_and_subtracting_neither_creates_nor_loses_money(a: int, b: int) -> None:
    x, y = Money(a, "CNY"), Money(b, "CNY")
    assert (x + y) - y == x
    assert (x + y).value == a + b
    assert x + (-x) == Money(0, "CNY")


def test_currencies_do_not_mix_and_floats_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot combine CNY with USD"):
        Money(100, "CNY") + Money(100, "USD")
    with pytest.raises(TypeError):
        Money(1.5, "CNY")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Money(True, "CNY")
    with pytest.raises(UnknownCurrencyError):
        Money(1, "XYZ")


def test_minor_units_follow_iso_4217() -> None:
    assert (currency_exponent("JPY"), currency_exponent("CNY"), currency_exponent("KWD")) == (0, 2, 3)
    assert str(Money(129900, "CNY")) == "1299.00 CNY"
    assert str(Money(-5, "KWD")) == "-0.005 KWD"
    assert str(Money(1500, "JPY")) == "1500 JPY"
    assert Money(129900, "CNY").major == 1299.0


def test_the_base_currency_converts_at_its_rates_and_its_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "currencies.toml"
    assert load_base_currency(path) is None  # no file: no amount.base
    path.write_text('base = "CNY"\n[rates]\nUSD = 7.1\nJPY = 0.047\n')
    base = load_base_currency(path)
    assert base is not None
    assert base.convert(1000.0, "USD") == pytest.approx(7100.0)
    assert base.convert(12.5, "CNY") == 12.5
    assert base.convert(5.0, "BRL") is None
    for text, message in (
        ('base = "XYZ"\n', "base must be an ISO 4217 code"),
        ('base = "CNY"\n[rates]\nUSD = -7\n', "USD = -7 is not a positive number"),
        ('base = "CNY"\n[rates]\nUSD = "7.1"\n', "is not a positive number"),
        ('base = "CNY"\n[rates]\nUSDX = 7\n', "'USDX' is not an ISO 4217 code"),
        ('base = "CNY"\n[rates]\nCNY = 2\n', "the base currency CNY is worth 1"),
        ('base = "CNY"\nrate = {}\n', "unknown key 'rate'"),
        ("base = \n", "currencies.toml"),
    ):
        path.write_text(text)
        with pytest.raises(CurrencyConfigError, match=message):
            load_base_currency(path)
