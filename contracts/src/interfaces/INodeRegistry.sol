// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title INodeRegistry
/// @notice What the contribution ledger needs from the node registry.
interface INodeRegistry {
    /// @notice The operator (share recipient) of a registered node, or address(0) if never registered.
    function operatorOf(address nodeKey) external view returns (address);

    /// @notice The operator of a node (address(0) if never registered), when its current bond started, and when that
    /// bond's stake can first be withdrawn (type(uint64).max while active; unbondsAt once unbonding or withdrawn).
    /// Between bondedAt and withdrawableAt the stake is slashable.
    function bondOf(address nodeKey) external view returns (address operator, uint64 bondedAt, uint64 withdrawableAt);

    /// @notice Slashes up to `amount` wei of a node's stake; callable only by the ledger. Returns the amount slashed.
    function slash(address nodeKey, uint256 amount, bytes32 evidence) external returns (uint256);

    /// @notice The stake in wei currently bonded by a node.
    function stakeOf(address nodeKey) external view returns (uint256);
}
