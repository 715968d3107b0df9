"""Money: integer minor units plus an ISO 4217 currency code. Never a float."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# ISO 4217 active codes and their minor-unit exponents (number of decimal places).
_EXPONENT_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"
_EXPONENT_2 = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP BYN BZD "
    "CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS "
    "GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL "
    "MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK "
    "PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS "
    "TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VES VED WST XCD XCG YER ZAR ZMW ZWG"
)

CURRENCY_EXPONENTS: dict[str, int] = {
    **{code: 0 for code in _EXPONENT_0.split()},
    **{code: 2 for code in _EXPONENT_2.split()},
    **{code: 3 for code in _EXPONENT_3.split()},
    **{code: 4 for code in _EXPONENT_4.split()},
}


class UnknownCurrencyError(ValueError):
    """Raised for a code that is not an active ISO 4217 currency."""


def currency_exponent(code: str) -> int:
    """Number of minor-unit digits of an ISO 4217 currency (JPY 0, CNY 2, KWD 3)."""
    try:
        return CURRENCY_EXPONENTS[code]
    except KeyError:
        raise UnknownCurrencyError(f"unknown currency {code!r}: expected an ISO 4217 code such as CNY") from None


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in integer minor units (fen, cents) of one currency."""

    value: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise TypeError("money value must be an integer number of minor units")
        currency_exponent(self.currency)

    @property
    def major(self) -> float:
        """The amount in major units (yuan, euros), for display and rules only, never for arithmetic."""
        return float(self.value) / float(10 ** currency_exponent(self.currency))

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.value + other.value, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.value - other.value, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.value, self.currency)

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise ValueError(f"cannot combine {self.currency} with {other.currency}")

    def __str__(self) -> str:
        exp = currency_exponent(self.currency)
        sign = "-" if self.value < 0 else ""
        whole, frac = divmod(abs(self.value), 10**exp)
        return f"{sign}{whole}.{frac:0{exp}d} {self.currency}" if exp else f"{sign}{whole} {self.currency}"


@dataclass(frozen=True, slots=True)
class BaseCurrency:
    """The platform's base currency and what one major unit of each other currency is worth in it, so rules
    compare and sum amounts paid in different currencies (``amount.base``). For scoring only: no money is
    converted or moved with these rates."""

    code: str
    rates: Mapping[str, float]

    def convert(self, major: float, currency: str) -> float | None:
        """``major`` units of ``currency`` in the base currency's major units; None without a rate."""
        if currency == self.code:
            return major
        rate = self.rates.get(currency)
        return major * rate if rate is not None else None


class CurrencyConfigError(ValueError):
    """``currencies.toml`` does not say what it must."""


def load_base_currency(path: Path) -> BaseCurrency | None:
    """Read ``currencies.toml`` (``base = "CNY"`` and ``[rates] USD = 7.1``); None if there is no such file."""
    if not path.exists():
        return None
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CurrencyConfigError(f"{path}: {exc}") from exc
    unknown = set(data) - {"base", "rates"}
    if unknown:
        raise CurrencyConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected base and [rates]")
    base = data.get("base")
    if not isinstance(base, str) or base not in CURRENCY_EXPONENTS:
        raise CurrencyConfigError(f'{path}: base must be an ISO 4217 code such as "CNY", not {base!r}')
    rates: dict[str, float] = {}
    raw = data.get("rates", {})
    if not isinstance(raw, dict):
        raise CurrencyConfigError(f"{path}: [rates] must be a table of CODE = rate")
    for code, rate in raw.items():
        if code not in CURRENCY_EXPONENTS:
            raise CurrencyConfigError(f"{path}: rates: {code!r} is not an ISO 4217 code")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
            raise CurrencyConfigError(f"{path}: rates: {code} = {rate!r} is not a positive number")
        rates[code] = float(rate)
    if rates.get(base, 1.0) != 1.0:
        raise CurrencyConfigError(f"{path}: rates: the base currency {base} is worth 1, not {rates[base]}")
    return BaseCurrency(base, rates)
