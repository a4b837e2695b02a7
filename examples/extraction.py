"""Structured extraction into a pydantic model: the output is validated, typed data.

    python examples/extraction.py
"""

from __future__ import annotations

import dspy
import pydantic

import velollm


class Contact(pydantic.BaseModel):
    name: str
    company: str
    email: str


class ExtractContact(dspy.Signature):
    """Extract the contact details from the email signature."""

    text: str = dspy.InputField()
    contact: Contact = dspy.OutputField()


TEXT = """Thanks for the quick reply!
Best regards,
Jane Doe
Acme Robotics
jane.doe@acme-robotics.com"""


def main() -> Contact:
    dspy.configure(lm=velollm.LM(max_tokens=96), adapter=velollm.Adapter())
    contact = dspy.Predict(ExtractContact)(text=TEXT).contact
    print(repr(contact))
    return contact


if __name__ == "__main__":
    main()
