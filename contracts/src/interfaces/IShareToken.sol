// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IShareToken
/// @notice What the registry and the ledger need from a model's ShareToken.
interface IShareToken {
    /// @notice Initializes a fresh clone; callable once.
    function initialize(string calldata name_, string calldata symbol_, uint256 modelId_, address minter_) external;

    /// @notice Mints `amount` shares to `to`; callable only by the minter (the ledger).
    function mint(address to, uint256 amount) external;
}
