"""The API's JSON parser: DRF's, refusing with a 400 (not a 500) what it cannot take."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError

from ..validators import lone_surrogate_problem


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, plus: a body nested deeper than Python's parser can go, and text that
    no database can store (a lone surrogate), are a ParseError like any other bad JSON."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(
                "JSON parse error - the body is nested too deeply (arrays or objects inside each "
                "other, hundreds of levels)."
            ) from None
        if problem := lone_surrogate_problem(data):
            raise ParseError(f"JSON parse error - {problem}")
        return data
