"""The wire: activation frames and the credit-controlled activation channel."""
