"""Errors of the `pmn` command line: every failure a user can cause ends as one of these."""


class CLIError(Exception):
    """Root of CLI errors: the message is printed as one line, with what to do next."""


class ConfigError(CLIError):
    """A role config file or environment override is missing, malformed or out of range."""


class WalletError(CLIError):
    """A keystore file is missing, malformed, or its password is wrong."""


class DeploymentError(CLIError):
    """The deployment file is missing or does not describe the chain at the given RPC URL."""
