// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ForceSender (test helper)
/// @notice Forces ETH into a contract that refuses it, through selfdestruct.
contract ForceSender {
    /// @notice Sends msg.value to `target` without calling it.
    /// @param target The recipient.
    function force(address payable target) external payable {
        selfdestruct(target);
    }
}
