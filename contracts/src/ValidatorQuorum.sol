// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControlEnumerable} from "@openzeppelin/contracts/access/extensions/AccessControlEnumerable.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {IAttestationQuorum} from "./interfaces/IAttestationQuorum.sol";

/// @title ValidatorQuorum
/// @notice M-of-N attestation by accounts holding VALIDATOR_ROLE. Signatures must be ordered by strictly
/// increasing signer address, which rejects duplicates without storage. The validators are also the registered
/// attesters of the audit protocol; `validators()` lists them (off-chain sampling sorts the list by address).
contract ValidatorQuorum is AccessControlEnumerable, IAttestationQuorum {
    /// @notice Role of the attesting validators.
    bytes32 public constant VALIDATOR_ROLE = keccak256("VALIDATOR_ROLE");

    /// @notice Number of distinct validator signatures needed.
    uint256 public quorum;

    /// @notice Number of accounts holding VALIDATOR_ROLE.
    uint256 public validatorCount;

    /// @notice The quorum is zero or larger than the validator count.
    error ValidatorQuorumInvalidQuorum(uint256 quorum, uint256 validatorCount);
    /// @notice A signature could not be parsed or recovered.
    error ValidatorQuorumInvalidSignature(uint256 index);
    /// @notice Signers are not in strictly increasing order (unsorted or duplicated).
    error ValidatorQuorumSignersNotSorted(uint256 index, address signer);
    /// @notice A signer does not hold VALIDATOR_ROLE.
    error ValidatorQuorumNotValidator(uint256 index, address signer);
    /// @notice Fewer validator signatures than the quorum.
    error ValidatorQuorumNotReached(uint256 signatures, uint256 quorum);

    /// @notice The quorum changed.
    event QuorumChanged(uint256 oldQuorum, uint256 newQuorum);

    /// @param admin Holder of DEFAULT_ADMIN_ROLE (manages validators and the quorum).
    /// @param validators Initial validators.
    /// @param quorum_ Initial quorum (1..validators.length).
    constructor(address admin, address[] memory validators, uint256 quorum_) {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        for (uint256 i = 0; i < validators.length; ++i) {
            _grantRole(VALIDATOR_ROLE, validators[i]);
        }
        _setQuorum(quorum_);
    }

    /// @notice Sets the number of validator signatures needed; admin only.
    /// @param newQuorum The new quorum (1..validatorCount).
    function setQuorum(uint256 newQuorum) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setQuorum(newQuorum);
    }

    /// @inheritdoc IAttestationQuorum
    function verify(bytes32 digest, bytes[] calldata signatures) external view returns (bool) {
        address previous = address(0);
        for (uint256 i = 0; i < signatures.length; ++i) {
            (address signer, ECDSA.RecoverError err, ) = ECDSA.tryRecover(digest, signatures[i]);
            if (err != ECDSA.RecoverError.NoError) revert ValidatorQuorumInvalidSignature(i);
            if (signer <= previous) revert ValidatorQuorumSignersNotSorted(i, signer);
            if (!hasRole(VALIDATOR_ROLE, signer)) revert ValidatorQuorumNotValidator(i, signer);
            previous = signer;
        }
        if (signatures.length < quorum) revert ValidatorQuorumNotReached(signatures.length, quorum);
        return true;
    }

    /// @notice Every account holding VALIDATOR_ROLE, in no particular order (sort off chain).
    function validators() external view returns (address[] memory) {
        return getRoleMembers(VALIDATOR_ROLE);
    }

    function _setQuorum(uint256 newQuorum) private {
        if (newQuorum == 0 || newQuorum > validatorCount) revert ValidatorQuorumInvalidQuorum(newQuorum, validatorCount);
        emit QuorumChanged(quorum, newQuorum);
        quorum = newQuorum;
    }

    function _grantRole(bytes32 role, address account) internal override returns (bool granted) {
        granted = super._grantRole(role, account);
        if (granted && role == VALIDATOR_ROLE) ++validatorCount;
    }

    function _revokeRole(bytes32 role, address account) internal override returns (bool revoked) {
        revoked = super._revokeRole(role, account);
        if (revoked && role == VALIDATOR_ROLE) {
            --validatorCount;
            if (validatorCount < quorum) revert ValidatorQuorumInvalidQuorum(quorum, validatorCount);
        }
    }
}
