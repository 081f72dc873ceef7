// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IAttestationQuorum
/// @notice The rule that decides whether a set of signatures attests a digest (M-of-N validators today).
interface IAttestationQuorum {
    /// @notice Returns true when `signatures` over `digest` satisfy the quorum; reverts with a named error otherwise.
    /// @param digest The EIP-712 digest that was signed.
    /// @param signatures 65-byte ECDSA signatures, ordered by strictly increasing signer address.
    function verify(bytes32 digest, bytes[] calldata signatures) external view returns (bool);
}
