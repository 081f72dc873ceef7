// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ReentrantClaimer (test helper)
/// @notice Holds shares and re-enters `claim` when it receives ETH.
contract ReentrantClaimer {
    /// @notice The token attacked.
    address public immutable token;

    /// @param token_ The ShareToken to attack.
    constructor(address token_) {
        token = token_;
    }

    /// @notice Calls claim on the token; the token's payment re-enters below.
    function attack() external {
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSignature("claim()"));
        if (!ok) {
            assembly {
                revert(add(ret, 32), mload(ret))
            }
        }
    }

    /// @notice Re-enters claim on receipt of ETH, bubbling up any revert.
    receive() external payable {
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSignature("claim()"));
        if (!ok) {
            assembly {
                revert(add(ret, 32), mload(ret))
            }
        }
    }
}
