"""ledger: an event-sourced, tamper-evident audit ledger for Bitrix24 chatbot events."""

__version__ = "0.1.0"
