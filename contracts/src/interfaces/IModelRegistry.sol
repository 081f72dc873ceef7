// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IModelRegistry
/// @notice What the contribution ledger needs from the model registry.
interface IModelRegistry {
    /// @notice Lifecycle of a model.
    enum Status {
        None,
        Proposed,
        Training,
        Retired
    }

    /// @notice The lifecycle status of a model.
    function statusOf(uint256 modelId) external view returns (Status);

    /// @notice The challenge window of a model in seconds.
    function challengeWindowOf(uint256 modelId) external view returns (uint64);

    /// @notice The ShareToken of a model.
    function shareTokenOf(uint256 modelId) external view returns (address);

    /// @notice The number of pipeline stages of a model (reverts for an unknown model).
    function numStagesOf(uint256 modelId) external view returns (uint16);
}
